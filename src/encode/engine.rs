//! Which engine encodes for a tokenizer: a fast exact one where chatmask can show it is exact
//! for this configuration, else the `tokenizers` crate (the reference, and the fallback).
//!
//! The gate has two halves. [`fast_kind`] admits only configurations whose every component
//! (normalizer, pre-tokenizer, model options, added-token flags) is in the supported set; then
//! [`super::probe::first_difference`] encodes an embedded probe corpus with both engines and any
//! difference sends the tokenizer back to `tokenizers`.

use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, Once, OnceLock, Weak};

use rustc_hash::FxHashMap;

use serde_json::Value;
use tokenizers::Tokenizer;

use super::probe;
use super::sentencepiece::SentencePieceBpe;
use crate::error::{Error, Result};

/// What the caller asked for at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncoderChoice {
    /// The fast engine when the gate passes, else `tokenizers`.
    Auto,
    /// The fast engine, or an error naming what stops it.
    Fast,
    /// Always the `tokenizers` crate.
    Tokenizers,
}

impl EncoderChoice {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(EncoderChoice::Auto),
            "fast" => Some(EncoderChoice::Fast),
            "tokenizers" => Some(EncoderChoice::Tokenizers),
            _ => None,
        }
    }
}

/// The fast engines: `fastokens` for byte-level BPE, chatmask's own for SentencePiece-style BPE.
pub enum FastEngine {
    Fastokens(Box<fastokens::Tokenizer>),
    SentencePiece(Box<SentencePieceBpe>),
}

impl FastEngine {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            FastEngine::Fastokens(t) => t
                .encode(text)
                .map_err(|e| Error::Tokenizer(format!("fast encoder: {e}"))),
            FastEngine::SentencePiece(t) => Ok(t.encode(text)),
        }
    }
}

/// Why the `tokenizers` crate encodes for a tokenizer.
#[derive(Clone, Debug)]
pub enum Fallback {
    /// The caller chose it.
    Chosen,
    /// A component outside the supported set.
    Unsupported(String),
    /// The self-check found a probe the two engines encode differently.
    Differs(String),
}

impl Fallback {
    pub fn describe(&self) -> String {
        match self {
            Fallback::Chosen => "encoder='tokenizers' was chosen".into(),
            Fallback::Unsupported(why) => format!("unsupported by the fast encoder: {why}"),
            Fallback::Differs(why) => format!("the fast encoder's self-check failed: {why}"),
        }
    }
}

/// Seconds the gate took for a tokenizer: building the fast engine, and the probe self-check.
#[derive(Clone, Copy, Debug, Default)]
pub struct GateTiming {
    pub build: f64,
    pub probes: f64,
}

/// The outcome of the gate for one tokenizer, shared by every encoder of the same tokenizer.
pub struct Gate {
    pub fast: Option<FastEngine>,
    pub fallback: Option<Fallback>,
    pub timing: GateTiming,
}

enum Kind {
    Fastokens,
    SentencePiece,
}

fn type_of(v: &Value) -> &str {
    v["type"].as_str().unwrap_or("?")
}

fn empty_or_null(v: &Value) -> bool {
    v.is_null() || v.as_str() == Some("")
}

/// The pre-tokenizers `fastokens` implements exactly for byte-level BPE: regex `Split`s
/// (isolated) followed by `ByteLevel` without its own regex, or `ByteLevel` alone.
fn byte_level_pre_tokenizer(pre: &Value) -> std::result::Result<(), String> {
    let steps: Vec<&Value> = match type_of(pre) {
        "Sequence" => pre["pretokenizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![pre],
    };
    let Some((last, splits)) = steps.split_last() else {
        return Err("an empty pre_tokenizer Sequence".into());
    };
    if type_of(last) != "ByteLevel" || last["add_prefix_space"].as_bool() == Some(true) {
        return Err(format!(
            "pre_tokenizer {} (not ByteLevel without add_prefix_space)",
            type_of(last)
        ));
    }
    if !splits.is_empty() && last["use_regex"].as_bool() != Some(false) {
        return Err("ByteLevel with use_regex after a Split".into());
    }
    for split in splits {
        let ok = type_of(split) == "Split"
            && split["pattern"].get("Regex").is_some()
            && split["behavior"].as_str() == Some("Isolated")
            && split["invert"].as_bool() != Some(true);
        if !ok {
            return Err(format!(
                "pre_tokenizer {} (only isolated regex Splits before ByteLevel)",
                type_of(split)
            ));
        }
    }
    Ok(())
}

/// Which fast engine a serialized tokenizer may use, or the first unsupported component.
fn fast_kind(json: &Value) -> std::result::Result<Kind, String> {
    let model = &json["model"];
    if type_of(model) != "BPE" {
        return Err(format!("model {}", type_of(model)));
    }
    if !model["dropout"].is_null() && model["dropout"].as_f64() != Some(0.0) {
        return Err("BPE dropout".into());
    }
    for option in ["continuing_subword_prefix", "end_of_word_suffix"] {
        if !empty_or_null(&model[option]) {
            return Err(format!("BPE {option}"));
        }
    }
    let normalizer = &json["normalizer"];
    let nfc = type_of(normalizer) == "NFC";
    if !normalizer.is_null() && !nfc {
        return Err(format!("normalizer {}", type_of(normalizer)));
    }
    let (mut normalized, mut raw) = (0, 0);
    for token in json["added_tokens"].as_array().into_iter().flatten() {
        for flag in ["lstrip", "rstrip", "single_word"] {
            if token[flag].as_bool() == Some(true) {
                return Err(format!("added token {} with {flag}", token["content"]));
            }
        }
        if token["normalized"].as_bool() == Some(true) {
            if !normalizer.is_null() {
                return Err(format!(
                    "added token {} with normalized=true under a normalizer",
                    token["content"]
                ));
            }
            normalized += 1;
        } else {
            raw += 1;
        }
    }
    // transformers matches the non-normalized tokens first and the normalized ones in what is
    // left; one pass over both (fastokens without a normalizer) differs where they overlap.
    if normalized > 0 && raw > 0 {
        return Err(format!(
            "added tokens mixing normalized=true ({normalized}) and normalized=false ({raw})"
        ));
    }
    let pre = &json["pre_tokenizer"];
    if type_of(pre) == "Metaspace" {
        if !normalizer.is_null() {
            return Err(format!(
                "normalizer {} before Metaspace",
                type_of(normalizer)
            ));
        }
        return Ok(Kind::SentencePiece);
    }
    if pre.is_null() {
        return Err("no pre_tokenizer".into());
    }
    byte_level_pre_tokenizer(pre)?;
    Ok(Kind::Fastokens)
}

fn build(
    kind: Kind,
    mut json: Value,
    tokenizer: &Tokenizer,
) -> std::result::Result<FastEngine, String> {
    match kind {
        Kind::Fastokens => {
            // Encoding never pads or truncates here (see `Encoder::new`).
            json["truncation"] = Value::Null;
            json["padding"] = Value::Null;
            let engine =
                fastokens::Tokenizer::from_json(json).map_err(|e| format!("fastokens: {e}"))?;
            Ok(FastEngine::Fastokens(Box::new(engine)))
        }
        Kind::SentencePiece => {
            let added: Vec<(String, u32)> = tokenizer
                .get_added_tokens_decoder()
                .into_iter()
                .map(|(id, t)| (t.content, id))
                .collect();
            let engine = SentencePieceBpe::new(&json["model"], &json["pre_tokenizer"], &added)?;
            Ok(FastEngine::SentencePiece(Box::new(engine)))
        }
    }
}

/// `fastokens` would start a thread pool of its own for long inputs; chatmask parallelises
/// over rows instead, so every engine runs on the calling thread.
fn keep_fastokens_on_the_calling_thread() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::env::set_var("FASTOKENS_BPE_THREADS", "1"));
}

/// Gates already run in this process, by the tokenizer's serialized form: building fastokens'
/// tables and the self-check cost about a second, and a process loads the same tokenizer many
/// times (every template, every unpickled copy, the drop-in's cache).
type GateCache = Mutex<FxHashMap<u64, Vec<(Arc<str>, Weak<Gate>)>>>;

fn gate_cache() -> &'static GateCache {
    static CACHE: OnceLock<GateCache> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// Runs the gate for `tokenizer` (whose serialized form is `json`) under `choice`.
pub fn select(tokenizer: &Tokenizer, json: &str, choice: EncoderChoice) -> Result<Arc<Gate>> {
    if choice == EncoderChoice::Tokenizers {
        return Ok(Arc::new(Gate {
            fast: None,
            fallback: Some(Fallback::Chosen),
            timing: GateTiming::default(),
        }));
    }
    let key = rustc_hash::FxBuildHasher.hash_one(json);
    let cached = {
        let mut cache = gate_cache().lock().expect("gate cache lock");
        let entries = cache.entry(key).or_default();
        entries.retain(|(_, gate)| gate.strong_count() > 0);
        entries
            .iter()
            .find(|(text, _)| &**text == json)
            .and_then(|(_, gate)| gate.upgrade())
    };
    let gate = match cached {
        Some(gate) => gate,
        None => {
            let gate = Arc::new(run_gate(tokenizer, json));
            let mut cache = gate_cache().lock().expect("gate cache lock");
            cache
                .entry(key)
                .or_default()
                .push((Arc::from(json), Arc::downgrade(&gate)));
            gate
        }
    };
    match (&gate.fallback, choice) {
        (Some(fallback), EncoderChoice::Fast) => Err(Error::Tokenizer(format!(
            "encoder='fast': {}",
            fallback.describe()
        ))),
        _ => Ok(gate),
    }
}

fn run_gate(tokenizer: &Tokenizer, json: &str) -> Gate {
    let started = std::time::Instant::now();
    let built = (|| {
        let value: Value = serde_json::from_str(json).map_err(|e| format!("cannot parse: {e}"))?;
        let kind = fast_kind(&value)?;
        keep_fastokens_on_the_calling_thread();
        build(kind, value, tokenizer)
    })();
    let build_seconds = started.elapsed().as_secs_f64();
    let engine = match built {
        Ok(engine) => engine,
        Err(why) => {
            let timing = GateTiming {
                build: build_seconds,
                probes: 0.0,
            };
            return Gate {
                fast: None,
                fallback: Some(Fallback::Unsupported(why)),
                timing,
            };
        }
    };
    let probing = std::time::Instant::now();
    let difference = probe::first_difference(tokenizer, &engine);
    let timing = GateTiming {
        build: build_seconds,
        probes: probing.elapsed().as_secs_f64(),
    };
    match difference {
        Some(why) => Gate {
            fast: None,
            fallback: Some(Fallback::Differs(why)),
            timing,
        },
        None => Gate {
            fast: Some(engine),
            fallback: None,
            timing,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{self, DemoKind};

    /// Why the gate refuses mixed `normalized` flags: fastokens matches both kinds in one pass,
    /// transformers takes the non-normalized ones first.
    #[test]
    fn fastokens_differs_on_mixed_normalized_added_tokens() {
        let mut json: Value =
            serde_json::from_str(&demo::tokenizer_json(DemoKind::ByteLevel).unwrap()).unwrap();
        let added = json["added_tokens"].as_array_mut().unwrap();
        for (id, content, normalized) in [(900, "ab", false), (901, "xa", true)] {
            added.push(serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": normalized, "special": false}));
        }
        let reference: Tokenizer = json.to_string().parse().unwrap();
        let fast = fastokens::Tokenizer::from_json(json.clone()).unwrap();
        let want = reference
            .encode_fast("xab", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let ab = reference.token_to_id("ab").unwrap();
        assert!(
            want.ends_with(&[ab]),
            "the reference splits at the non-normalized \"ab\" first: {want:?}"
        );
        assert_ne!(fast.encode("xab").unwrap(), want);
        assert!(fast_kind(&json)
            .err()
            .unwrap()
            .contains("mixing normalized"));
    }

    fn kind_of(json: &str) -> std::result::Result<&'static str, String> {
        fast_kind(&serde_json::from_str(json).unwrap()).map(|k| match k {
            Kind::Fastokens => "fastokens",
            Kind::SentencePiece => "sentencepiece",
        })
    }

    #[test]
    fn components_outside_the_set_are_named() {
        let bpe = r#""model": {"type": "BPE", "dropout": null}"#;
        let bl = r#""pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}"#;
        assert_eq!(
            kind_of(&format!("{{{bpe}, {bl}, \"normalizer\": null}}")),
            Ok("fastokens")
        );
        assert_eq!(
            kind_of(&format!(
                "{{{bpe}, {bl}, \"normalizer\": {{\"type\": \"NFC\"}}}}"
            )),
            Ok("fastokens")
        );
        let meta = r#""pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false}"#;
        assert_eq!(
            kind_of(&format!("{{{bpe}, {meta}, \"normalizer\": null}}")),
            Ok("sentencepiece")
        );
        let cases = [
            (
                format!(r#"{{"model": {{"type": "WordPiece"}}, {bl}}}"#),
                "model WordPiece",
            ),
            (
                format!(r#"{{{bpe}, "pre_tokenizer": {{"type": "BertPreTokenizer"}}}}"#),
                "pre_tokenizer BertPreTokenizer",
            ),
            (
                format!(r#"{{{bpe}, {bl}, "normalizer": {{"type": "Lowercase"}}}}"#),
                "normalizer Lowercase",
            ),
            (
                format!(r#"{{{bpe}, {meta}, "normalizer": {{"type": "NFC"}}}}"#),
                "normalizer NFC before Metaspace",
            ),
            (
                format!(r#"{{"model": {{"type": "BPE", "dropout": 0.1}}, {bl}}}"#),
                "BPE dropout",
            ),
            (
                format!(
                    r#"{{{bpe}, {bl}, "added_tokens": [{{"content": "<x>", "lstrip": true}}]}}"#
                ),
                "lstrip",
            ),
            (
                format!(
                    r#"{{{bpe}, {bl}, "added_tokens": [{{"content": "<x>", "single_word": true}}]}}"#
                ),
                "single_word",
            ),
        ];
        for (json, why) in cases {
            let err = kind_of(&json)
                .err()
                .unwrap_or_else(|| panic!("{json} was admitted"));
            assert!(err.contains(why), "{err:?} does not name {why:?}");
        }
    }
}
