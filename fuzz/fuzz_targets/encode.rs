//! The fast encoding engine against the `tokenizers` crate on arbitrary text: every fixture
//! tokenizer in `$CHATMASK_SHARED/fixtures/tokenizers` (default `../../shared`) that gets the
//! fast engine, plus both demo tokenizers. Text is built from arbitrary strings and the
//! tokenizers' own added tokens, whole or cut, so token boundaries are exercised too.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use chatmask::demo::{self, DemoKind};
use chatmask::encode::{Encoder, EncoderChoice};
use libfuzzer_sys::fuzz_target;

fn encoders() -> &'static Vec<(String, Encoder, Vec<String>)> {
    static ENCODERS: OnceLock<Vec<(String, Encoder, Vec<String>)>> = OnceLock::new();
    ENCODERS.get_or_init(|| {
        let mut jsons: Vec<(String, String)> = [DemoKind::ByteLevel, DemoKind::Metaspace]
            .into_iter()
            .map(|k| {
                (
                    format!("demo-{k:?}"),
                    demo::tokenizer_json(k).expect("demo tokenizer"),
                )
            })
            .collect();
        let shared = std::env::var("CHATMASK_SHARED").unwrap_or_else(|_| "../../shared".into());
        for name in ["qwen3", "llama3", "mistral-nemo", "mistral-7b-v0.3"] {
            let path = format!("{shared}/fixtures/tokenizers/{name}/tokenizer.json");
            if let Ok(json) = std::fs::read_to_string(&path) {
                jsons.push((name.to_string(), json));
            }
        }
        jsons
            .into_iter()
            .map(|(name, json)| {
                let enc = Encoder::from_json(&json, EncoderChoice::Fast).expect("fast engine");
                let added = enc
                    .tokenizer()
                    .get_added_tokens_decoder()
                    .into_values()
                    .map(|t| t.content)
                    .collect();
                (name, enc, added)
            })
            .collect()
    })
}

#[derive(Arbitrary, Debug)]
enum Piece {
    Text(String),
    Token(u16),
    Cut(u16, u8),
    Repeat(char, u8),
}

fuzz_target!(|input: (u8, Vec<Piece>)| {
    let all = encoders();
    let (name, enc, added) = &all[input.0 as usize % all.len()];
    let mut text = String::new();
    for piece in &input.1 {
        match piece {
            Piece::Text(s) => text.push_str(s),
            Piece::Token(i) => text.push_str(&added[*i as usize % added.len()]),
            Piece::Cut(i, at) => {
                let t = &added[*i as usize % added.len()];
                let mut cut = (*at as usize) % (t.len() + 1);
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.push_str(if at % 2 == 0 { &t[..cut] } else { &t[cut..] });
            }
            Piece::Repeat(c, n) => text.extend(std::iter::repeat(*c).take(*n as usize * 8)),
        }
    }
    let got = enc.encode(&text).expect("fast encode");
    let want = enc.reference_encode(&text).expect("reference encode");
    assert_eq!(got, want, "{name} differs on {text:?}");
});
