//! Encoding (a fast exact engine where the load-time gate admits it, else the `tokenizers`
//! crate, see [`engine`]), and exact token counts of texts that share a prefix with an already
//! encoded text.
//!
//! The tokenizer splits its input at added tokens before it normalizes and pre-tokenizes, so the
//! tokens before an added token depend only on the text before it. To count the tokens of a text
//! `P` that agrees with an encoded text `F` on its first `k` bytes, take an added token of `F`
//! that starts at byte `a` with `a + max_added_len <= k` (so the added-token matcher cannot have
//! decided differently anywhere up to `a`), keep `F`'s tokens before it, and encode only
//! `P[a..]`. The tail starts with the added token itself, which keeps the context the
//! pre-tokenizer sees (a Metaspace `prepend_scheme: first` only fires at offset 0, which neither
//! the tail's second segment nor `F`'s has).

mod engine;
mod probe;
mod sentencepiece;

use std::sync::Arc;

use tokenizers::Tokenizer;

use engine::Gate;
pub use engine::{EncoderChoice, Fallback, GateTiming};

use crate::error::{Error, Result};

/// Each token's `(start, end)` in code points of the encoded text.
pub type CharSpans = Vec<(usize, usize)>;

const WORD_CACHE_CAPACITY: usize = 200_000;

/// A tokenizer, with what the prefix arithmetic needs to know about its added tokens.
pub struct Encoder {
    /// The reference engine: always loaded, for offsets, the self-check and the fallback.
    tokenizer: Tokenizer,
    /// The fast engine when the gate admitted one, else why not.
    gate: Arc<Gate>,
    choice: EncoderChoice,
    /// The text bytes each token id stands for, from the vocabulary (see [`Encoder::positions`]).
    pieces: Vec<Box<[u8]>>,
    /// Whether a token may carry a space the pre-tokenizer added (Metaspace's prepended `▁`).
    virtual_space: bool,
    /// Ids of added tokens marked special (end-of-turn candidates).
    special_added: Vec<u32>,
    /// `added_content[id]` is the content of added token `id`, if it is one.
    added_content: Vec<Option<Box<str>>>,
    /// The longest added token, in bytes.
    max_added_len: usize,
}

/// A text encoded once, with the positions of its added tokens.
pub struct Encoded {
    pub text: String,
    pub ids: Vec<u32>,
    /// (byte offset in `text`, token index) of each added token, in order.
    anchors: Vec<(usize, usize)>,
}

/// The tokens of another text, as a shared prefix of an [`Encoded`] plus a re-encoded tail.
pub struct PrefixTokens<'a> {
    full: &'a Encoded,
    shared: usize,
    tail: Vec<u32>,
}

impl<'a> PrefixTokens<'a> {
    /// The tokens of `full`'s own text.
    pub fn whole(full: &'a Encoded) -> Self {
        PrefixTokens {
            full,
            shared: full.ids.len(),
            tail: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.shared + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token `i` of the other text.
    pub fn get(&self, i: usize) -> u32 {
        if i < self.shared {
            self.full.ids[i]
        } else {
            self.tail[i - self.shared]
        }
    }

    /// The other text's tokens.
    pub fn to_vec(&self) -> Vec<u32> {
        [&self.full.ids[..self.shared], &self.tail[..]].concat()
    }

    /// How many tokens were re-encoded (the rest came from the shared prefix).
    pub fn tail_len(&self) -> usize {
        self.tail.len()
    }
}

/// GPT-2's byte-to-character table, inverted: which byte each byte-level character stands for.
fn byte_level_chars() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .map(|(b, c)| (char::from_u32(c).expect("table chars are valid"), b as u8))
        .collect()
}

/// The bytes of text every token id stands for, read from the vocabulary according to the
/// decoder (byte-level, or SentencePiece's `▁` and `<0xAB>` byte fallback); added tokens stand
/// for their content. Also whether Metaspace may have prepended a space the text lacks.
fn token_pieces(tokenizer: &Tokenizer, added: &[Option<Box<str>>]) -> (Vec<Box<[u8]>>, bool) {
    let decoder = tokenizer
        .get_decoder()
        .and_then(|d| serde_json::to_string(d).ok())
        .unwrap_or_default();
    let byte_level = decoder.contains("\"ByteLevel\"");
    let metaspace = !byte_level && (decoder.contains("\"Metaspace\"") || decoder.contains('▁'));
    let byte_fallback = decoder.contains("\"ByteFallback\"");
    let table = if byte_level {
        byte_level_chars()
    } else {
        Default::default()
    };
    let vocab = tokenizer.get_vocab(true);
    let size = vocab.values().copied().max().map_or(0, |m| m as usize + 1);
    let mut pieces: Vec<Box<[u8]>> = vec![Box::default(); size];
    for (token, id) in vocab {
        if let Some(Some(content)) = added.get(id as usize) {
            pieces[id as usize] = content.as_bytes().into();
            continue;
        }
        let bytes: Vec<u8> = if byte_level {
            match token
                .chars()
                .map(|c| table.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
            {
                Some(b) => b,
                None => token.into_bytes(),
            }
        } else if metaspace {
            let hex = (byte_fallback
                && token.len() == 6
                && token.starts_with("<0x")
                && token.ends_with('>'))
            .then(|| u8::from_str_radix(&token[3..5], 16).ok())
            .flatten();
            match hex {
                Some(b) => vec![b],
                None => token.replace('▁', " ").into_bytes(),
            }
        } else {
            token.into_bytes()
        };
        pieces[id as usize] = bytes.into();
    }
    (pieces, metaspace)
}

fn common_prefix_len(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let n = a.len().min(b.len());
    // Compare in chunks first: the common case is a long shared prefix.
    let mut i = 0;
    while i + 16 <= n && a[i..i + 16] == b[i..i + 16] {
        i += 16;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

impl Encoder {
    /// Wraps a tokenizer. Truncation and padding are switched off, as transformers does when
    /// `apply_chat_template` encodes.
    pub fn new(tokenizer: Tokenizer) -> Result<Encoder> {
        Encoder::with_choice(tokenizer, EncoderChoice::Auto)
    }

    /// Wraps a tokenizer and runs the engine gate for `choice`.
    pub fn with_choice(mut tokenizer: Tokenizer, choice: EncoderChoice) -> Result<Encoder> {
        // A corpus has far more distinct words than the default 10k-entry BPE word cache holds.
        let mut model = tokenizer.get_model().clone();
        model.resize_cache(WORD_CACHE_CAPACITY);
        tokenizer.with_model(model);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .with_padding(None);
        let decoder = tokenizer.get_added_tokens_decoder();
        let max_id = decoder.keys().copied().max().map_or(0, |m| m as usize + 1);
        let mut added_content = vec![None; max_id];
        let mut max_added_len = 0;
        let mut special_added: Vec<u32> = Vec::new();
        for (&id, token) in &decoder {
            max_added_len = max_added_len.max(token.content.len());
            added_content[id as usize] = Some(token.content.clone().into_boxed_str());
            if token.special {
                special_added.push(id);
            }
        }
        special_added.sort_unstable();
        let (pieces, virtual_space) = token_pieces(&tokenizer, &added_content);
        let json = tokenizer
            .to_string(false)
            .map_err(|e| Error::Tokenizer(format!("cannot serialize the tokenizer: {e}")))?;
        let gate = engine::select(&tokenizer, &json, choice)?;
        Ok(Encoder {
            tokenizer,
            gate,
            choice,
            pieces,
            virtual_space,
            special_added,
            added_content,
            max_added_len,
        })
    }

    pub fn from_json(json: &str, choice: EncoderChoice) -> Result<Encoder> {
        let tokenizer: Tokenizer = json.parse().map_err(|e: tokenizers::Error| {
            Error::Tokenizer(format!("cannot load tokenizer.json: {e}"))
        })?;
        Encoder::with_choice(tokenizer, choice)
    }

    /// `"fast"` or `"tokenizers"`: the engine `encode` uses.
    pub fn backend(&self) -> &'static str {
        if self.gate.fast.is_some() {
            "fast"
        } else {
            "tokenizers"
        }
    }

    /// Why the `tokenizers` crate encodes, when it does.
    pub fn fallback(&self) -> Option<&Fallback> {
        self.gate.fallback.as_ref()
    }

    /// What the caller asked for at load.
    pub fn choice(&self) -> EncoderChoice {
        self.choice
    }

    /// What the engine gate cost when this tokenizer was first loaded in the process.
    pub fn gate_timing(&self) -> GateTiming {
        self.gate.timing
    }

    /// Token ids from the `tokenizers` crate, whatever the engine (differential tests).
    pub fn reference_encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Token ids of `text`, without special tokens added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.gate.fast {
            Some(fast) => fast.encode(text),
            None => self.reference_encode(text),
        }
    }

    /// Token ids and each token's `(start, end)` in code points, as transformers' `char_to_token`
    /// sees them. Always the `tokenizers` crate: these are the tokenizer's own offsets, which
    /// the generation masks must reproduce quirks included.
    pub fn encode_with_char_offsets(&self, text: &str) -> Result<(Vec<u32>, CharSpans)> {
        let enc = self
            .tokenizer
            .encode_char_offsets(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Whether `id` is an added token marked special.
    pub fn is_special_added(&self, id: u32) -> bool {
        self.special_added.binary_search(&id).is_ok()
    }

    /// Token ids of `text` and each token's `(start, end)` in code points, derived from the
    /// tokens themselves: the bytes each token stands for, laid end to end along `text`.
    /// Returns `derived = false` when the pieces do not spell `text` (a normalizer changed it,
    /// an unknown token), and then uses the tokenizer's offsets, which have been reported wrong
    /// for some tokenizers (tokenizers #1553), so callers count such rows.
    pub fn encode_with_positions(&self, text: &str) -> Result<(Vec<u32>, CharSpans, bool)> {
        let ids = self.encode(text)?;
        if let Some(positions) = self.positions(text, &ids) {
            return Ok((ids, positions, true));
        }
        let (ids, offsets) = self.encode_with_char_offsets(text)?;
        Ok((ids, offsets, false))
    }

    /// The bytes `ids` stand for, laid end to end (a Metaspace `▁` as a space); None if an id
    /// has no known piece. Unlike `decode`, it drops nothing: no leading space, no cleanup.
    pub fn spelling(&self, ids: &[u32]) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for &id in ids {
            match self.pieces.get(id as usize) {
                Some(piece) if !piece.is_empty() => out.extend_from_slice(piece),
                _ => return None,
            }
        }
        Some(out)
    }

    /// Lays the pieces of `ids` along `text`, calling `visit(token index, id, byte start, byte
    /// length)` for each; false unless they spell it exactly.
    fn lay_pieces(
        &self,
        text: &str,
        ids: &[u32],
        mut visit: impl FnMut(usize, u32, usize, usize),
    ) -> bool {
        let bytes = text.as_bytes();
        let mut at = 0usize;
        for (idx, &id) in ids.iter().enumerate() {
            let Some(piece) = self.pieces.get(id as usize) else {
                return false;
            };
            let rest = &bytes[at..];
            let len = if rest.starts_with(piece) {
                piece.len()
            } else if self.virtual_space
                && piece.first() == Some(&b' ')
                && rest.starts_with(&piece[1..])
            {
                piece.len() - 1
            } else {
                return false;
            };
            visit(idx, id, at, len);
            at += len;
        }
        at == bytes.len()
    }

    /// Each token's `(start, end)` in code points, laid along `text`; `None` unless the
    /// tokens' pieces spell it exactly.
    pub fn positions(&self, text: &str, ids: &[u32]) -> Option<CharSpans> {
        let mut out = Vec::with_capacity(ids.len());
        let mut chars = CharCounter::default();
        let spelled = self.lay_pieces(text, ids, |_, _, at, len| {
            out.push(chars.span(text.as_bytes(), at, len));
        });
        spelled.then_some(out)
    }

    /// [`Self::encode_full`] and the tokens' [`Self::positions`] (None when not derived), laid
    /// along the text in one pass where the fast engine encoded it.
    pub fn encode_full_with_positions(&self, text: String) -> Result<(Encoded, Option<CharSpans>)> {
        if self.gate.fast.is_some() {
            let ids = self.encode(&text)?;
            let (mut anchors, mut positions) = (Vec::new(), Vec::with_capacity(ids.len()));
            let mut chars = CharCounter::default();
            let spelled = self.lay_pieces(&text, &ids, |idx, id, at, len| {
                if matches!(self.added_content.get(id as usize), Some(Some(_))) {
                    anchors.push((at, idx));
                }
                positions.push(chars.span(text.as_bytes(), at, len));
            });
            if spelled {
                return Ok((Encoded { text, ids, anchors }, Some(positions)));
            }
        }
        let full = self.encode_full(text)?;
        let positions = self.positions(&full.text, &full.ids);
        Ok((full, positions))
    }

    /// Encodes `text` and records where its added tokens are.
    pub fn encode_full(&self, text: String) -> Result<Encoded> {
        if self.gate.fast.is_some() {
            let ids = self.encode(&text)?;
            if let Some(anchors) = self.anchors_from_pieces(&text, &ids) {
                return Ok(Encoded { text, ids, anchors });
            }
        }
        let enc = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut anchors = Vec::new();
        for (idx, (&id, &(start, end))) in enc.get_ids().iter().zip(enc.get_offsets()).enumerate() {
            let Some(Some(content)) = self.added_content.get(id as usize) else {
                continue;
            };
            // Only trust an added token whose offsets really cover its text.
            if text.get(start..end).is_some_and(|s| s.contains(&**content)) {
                anchors.push((start, idx));
            }
        }
        Ok(Encoded {
            ids: enc.get_ids().to_vec(),
            text,
            anchors,
        })
    }

    /// The added tokens of `ids` and their byte offsets, found by laying the tokens' pieces
    /// along `text`; `None` unless the pieces spell it exactly (a normalizer changed it).
    fn anchors_from_pieces(&self, text: &str, ids: &[u32]) -> Option<Vec<(usize, usize)>> {
        let mut anchors = Vec::new();
        let spelled = self.lay_pieces(text, ids, |idx, id, at, _| {
            if matches!(self.added_content.get(id as usize), Some(Some(_))) {
                anchors.push((at, idx));
            }
        });
        spelled.then_some(anchors)
    }

    /// `text` and its tokens `ids` (already encoded) for [`Self::prefix_tokens`]; None unless
    /// the tokens' pieces spell the text, which is how the added tokens are found in it.
    pub fn encoded(&self, text: String, ids: Vec<u32>) -> Option<Encoded> {
        let anchors = self.anchors_from_pieces(&text, &ids)?;
        Some(Encoded { text, ids, anchors })
    }

    /// The tokens of `other`, reusing `full`'s tokens up to an added token both texts share.
    pub fn prefix_tokens<'a>(&self, full: &'a Encoded, other: &str) -> Result<PrefixTokens<'a>> {
        if other == full.text {
            return Ok(PrefixTokens::whole(full));
        }
        let common = common_prefix_len(&full.text, other);
        let safe_end = common.saturating_sub(self.max_added_len);
        // Last anchor starting at or before `safe_end`.
        let n_ok = full.anchors.partition_point(|&(byte, _)| byte <= safe_end);
        let (byte, shared) = if n_ok == 0 || common < self.max_added_len {
            (0, 0)
        } else {
            full.anchors[n_ok - 1]
        };
        let tail = self.encode(&other[byte..])?;
        Ok(PrefixTokens { full, shared, tail })
    }
}

/// Code points counted along a text as tokens are laid on it, for [`Encoder::positions`].
#[derive(Default)]
struct CharCounter {
    /// The code points that start before the cursor (UTF-8 lead bytes).
    before: usize,
}

impl CharCounter {
    /// The `(start, end)` in code points of the token at bytes `at..at + len` of `bytes`. A token
    /// that starts inside a code point (byte fallback splits one) owns that code point from its
    /// start; one that ends inside it owns it to its end.
    fn span(&mut self, bytes: &[u8], at: usize, len: usize) -> (usize, usize) {
        let mid_start = at < bytes.len() && bytes[at] & 0xC0 == 0x80;
        let start = self.before - usize::from(mid_start);
        self.before += bytes[at..at + len]
            .iter()
            .filter(|&&b| b & 0xC0 != 0x80)
            .count();
        let end = at + len;
        let mid_end = end < bytes.len() && bytes[end] & 0xC0 == 0x80;
        let stop = if len == 0 {
            start.max(self.before - usize::from(mid_end))
        } else {
            self.before
        };
        (start, stop)
    }
}

#[cfg(test)]
mod tests {
    use super::{Encoder, EncoderChoice};
    use crate::demo::{self, DemoKind};

    /// Texts that share prefixes with a chat in the ways templates produce: cut anywhere,
    /// cut at and around special tokens, and changed after a common prefix.
    fn variants(full: &str) -> Vec<String> {
        let mut out = Vec::new();
        let cuts: Vec<usize> = (0..=full.len())
            .filter(|&i| full.is_char_boundary(i))
            .collect();
        for &c in cuts.iter().step_by(3) {
            out.push(full[..c].to_string());
            out.push(format!("{}<|im_end|>\n", &full[..c]));
            out.push(format!("{} tail ▁x<|im_start|>assistant\n", &full[..c]));
        }
        out
    }

    #[test]
    fn positions_from_token_bytes_equal_offsets() {
        let texts = [
            "<|im_start|>user\n  Hello  there é 👋<|im_end|>\n",
            " leading space, and\nnewlines\n\n",
            "日本語のテキスト and mixed ñ ü 🤖🤖",
            "",
        ];
        for kind in [DemoKind::ByteLevel, DemoKind::Metaspace] {
            let enc = &demo::chat_tokenizer(kind).unwrap().encoder;
            // The Metaspace demo has no byte fallback: CJK and emoji are <unk> there (see below).
            let known = if kind == DemoKind::ByteLevel {
                &texts[..]
            } else {
                &texts[1..2]
            };
            for &text in known {
                let (ids, positions, derived) = enc.encode_with_positions(text).unwrap();
                let (want_ids, offsets) = enc.encode_with_char_offsets(text).unwrap();
                assert!(derived, "{kind:?}: pieces do not spell {text:?}");
                assert_eq!(ids, want_ids);
                assert_eq!(positions, offsets, "{kind:?} on {text:?}");
            }
            // Pieces that do not spell the text are refused, not guessed: the tokenizer's
            // offsets are used, and the caller is told.
            let ids = enc.encode("abc").unwrap();
            assert!(enc.positions("abd", &ids).is_none());
            if kind == DemoKind::Metaspace {
                // No byte fallback: tabs become <unk>, whose piece is not a tab.
                let (_, positions, derived) = enc.encode_with_positions("a\tb").unwrap();
                assert!(!derived);
                assert_eq!(positions, enc.encode_with_char_offsets("a\tb").unwrap().1);
            }
        }
    }

    #[test]
    fn prefix_tokens_equal_plain_encoding() {
        let chat = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  Hello  there é 👋<|im_end|>\n\
                    <|im_start|>assistant\n<think>\nx\n</think>\n\nHi!<|im_end|>\n<|im_start|>user\nok<|im_end|>\n";
        for (kind, choice) in [DemoKind::ByteLevel, DemoKind::Metaspace]
            .into_iter()
            .flat_map(|k| [(k, EncoderChoice::Fast), (k, EncoderChoice::Tokenizers)])
        {
            let tok = demo::chat_tokenizer(kind).unwrap();
            let enc = &Encoder::with_choice(tok.encoder.tokenizer().clone(), choice).unwrap();
            assert_eq!(
                enc.backend(),
                if choice == EncoderChoice::Fast {
                    "fast"
                } else {
                    "tokenizers"
                }
            );
            let full = enc.encode_full(chat.to_string()).unwrap();
            assert_eq!(full.ids, enc.reference_encode(chat).unwrap());
            let mut compared = 0;
            let mut reused = 0;
            for v in variants(chat) {
                let want = enc.reference_encode(&v).unwrap();
                let got = enc.prefix_tokens(&full, &v).unwrap();
                let got_ids: Vec<u32> = (0..got.len()).map(|i| got.get(i)).collect();
                assert_eq!(got_ids, want, "{kind:?} on {v:?}");
                compared += 1;
                reused += usize::from(got.tail_len() < want.len());
            }
            assert!(
                compared > 100 && reused > compared / 2,
                "{kind:?} {choice:?}: {reused} of {compared} reused a prefix"
            );
        }
    }
}
