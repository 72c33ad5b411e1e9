//! A small tokenizer and conversations that ship with the package, so the main job, the
//! examples and the core tests run offline without any model files.
//!
//! The tokenizer is trained here with the `tokenizers` BPE trainer on the demo conversations;
//! it is deterministic for a given `tokenizers` version.

use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerImpl};

use crate::error::{Error, Result};

pub const CONVERSATIONS_JSON: &str = include_str!("demo/conversations.json");
pub const CHAT_TEMPLATE: &str = include_str!("demo/chat_template.jinja");
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
pub const EOS_TOKEN: &str = "<|im_end|>";

/// Which pre-tokenizer family the demo tokenizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DemoKind {
    /// GPT-2/Qwen/Llama 3 style byte-level BPE.
    ByteLevel,
    /// SentencePiece style: Metaspace with `prepend_scheme: first`, as Mistral v0.3.
    Metaspace,
}

/// The text the demo tokenizer is trained on: every string in the demo conversations.
fn training_corpus() -> Vec<String> {
    let data: serde_json::Value =
        serde_json::from_str(CONVERSATIONS_JSON).expect("demo conversations are valid JSON");
    let mut out = vec![CHAT_TEMPLATE.to_string()];
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            serde_json::Value::Object(o) => o.values().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&data, &mut out);
    out
}

/// Trains the demo tokenizer and returns its `tokenizer.json`.
pub fn tokenizer_json(kind: DemoKind) -> Result<String> {
    let err = |e: tokenizers::Error| Error::Tokenizer(format!("training the demo tokenizer: {e}"));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut builder = BpeTrainerBuilder::new()
        .vocab_size(700)
        .min_frequency(1)
        .show_progress(false)
        .special_tokens(specials.clone());
    let (model, pre, dec) = match kind {
        DemoKind::ByteLevel => {
            builder = builder.initial_alphabet(ByteLevel::alphabet().into_iter().collect());
            let bl = ByteLevel::default().add_prefix_space(false);
            (
                BPE::default(),
                PreTokenizerWrapper::ByteLevel(bl),
                DecoderWrapper::ByteLevel(bl),
            )
        }
        DemoKind::Metaspace => {
            let ms = Metaspace::new('▁', PrependScheme::First, false);
            let model = BPE::builder()
                .unk_token("<|endoftext|>".into())
                .build()
                .map_err(err)?;
            (
                model,
                PreTokenizerWrapper::Metaspace(ms.clone()),
                DecoderWrapper::Metaspace(ms),
            )
        }
    };
    let mut trainer = builder.build();
    let mut tok: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(model);
    tok.with_pre_tokenizer(Some(pre)).with_decoder(Some(dec));
    tok.train(&mut trainer, training_corpus().into_iter())
        .map_err(err)?;
    tok.add_special_tokens(specials).map_err(err)?;
    tok.to_string(false).map_err(err)
}

/// The demo tokenizer wrapped as a [`crate::core::ChatTokenizer`] with the demo template.
pub fn chat_tokenizer(kind: DemoKind) -> Result<crate::core::ChatTokenizer> {
    let sources = crate::core::TemplateSources {
        default: Some(CHAT_TEMPLATE.to_string()),
        named: Vec::new(),
    };
    let specials = vec![("eos_token".into(), EOS_TOKEN.into())];
    crate::core::ChatTokenizer::new(
        &tokenizer_json(kind)?,
        sources,
        specials,
        crate::encode::EncoderChoice::Auto,
    )
}
