//! transformers 5's `apply_chat_template(..., sanitize_control_tokens=True)`: control tokens that
//! arrive in user input (messages, tools, documents, template kwargs) are encoded as plain text,
//! so only the control tokens the template writes itself become control-token ids.
//!
//! It works in three steps, each a port of transformers' `utils/chat_template_utils.py`:
//! 1. [`ControlTokens::mark`] wraps every control token in the input strings in the private-use
//!    markers U+F0000 / U+F0001 (`mark_control_tokens`), after dropping any markers already
//!    there, so input cannot forge a mark;
//! 2. the template renders the marked input as usual;
//! 3. [`encode_marked`] splits the render at the markers and encodes the marked tokens without
//!    added tokens and the rest normally (`encode_marked_chat`).
//!
//! Which tokens count as control tokens (`_get_control_tokens`): every special added token, plus
//! the non-special added tokens listed in `chat_control_tokens` (tokenizer_config.json) or, when
//! that is not set, those that occur in the template's literal text, except whitespace ones.

use std::borrow::Cow;

use minijinja::value::{Value, ValueKind};
use regex::Regex;
use tokenizers::{
    Model, NormalizedString, Normalizer, OffsetType, PreTokenizedString, PreTokenizer, Tokenizer,
};

use crate::encode::Encoder;
use crate::error::{Error, Result};
use crate::template::pyfmt::{map_pairs, py_str_repr};

/// transformers' `_CONTROL_TOKEN_START` / `_CONTROL_TOKEN_END`.
pub const MARK_START: char = '\u{F0000}';
pub const MARK_END: char = '\u{F0001}';

/// Token ids and each token's `(start, end)` in code points.
pub type IdsAndOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// The control tokens for one template and the regex that finds them.
pub struct ControlTokens {
    /// In added-token id order, as `_get_control_tokens` returns them.
    tokens: Vec<String>,
    /// Matches any control token, longest first; `None` when there are none (Python's `(?!)`).
    regex: Option<Regex>,
}

/// Python's `str.isspace()`: false on the empty string.
fn is_py_space_str(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

impl ControlTokens {
    /// transformers' `_get_control_tokens(chat_template)`: `chat_control_tokens` = Option of the tokenizer_config list.
    pub fn new(
        encoder: &Encoder,
        template_source: &str,
        chat_control_tokens: Option<&[String]>,
    ) -> Result<Self> {
        let mut added: Vec<(u32, tokenizers::AddedToken)> = encoder
            .tokenizer()
            .get_added_tokens_decoder()
            .into_iter()
            .collect();
        added.sort_unstable_by_key(|(id, _)| *id);
        let tokens: Vec<String> = match chat_control_tokens {
            Some(listed) => added
                .into_iter()
                .filter(|(_, t)| t.special || listed.contains(&t.content))
                .map(|(_, t)| t.content)
                .collect(),
            None => {
                let literal = template_literal_text(template_source)?;
                // A whitespace token like Gemma's "\n" occurs in nearly every template as ordinary text.
                added
                    .into_iter()
                    .filter(|(_, t)| {
                        t.special || (literal.contains(&t.content) && !is_py_space_str(&t.content))
                    })
                    .map(|(_, t)| t.content)
                    .collect()
            }
        };
        Ok(ControlTokens {
            regex: control_regex(&tokens)?,
            tokens,
        })
    }

    /// The control tokens, in added-token id order.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }

    /// `mark_control_tokens` on a minijinja Value (strings inside lists/maps, map keys untouched).
    pub fn mark(&self, v: &Value) -> Value {
        self.mark_changed(v).unwrap_or_else(|| v.clone())
    }

    /// Whether a string contains any control token (used to count rows with injected control strings).
    ///
    /// Read after dropping the markers, as `mark` reads it: `"<|im_" + U+F0000 + "start|>"` counts,
    /// since marking turns it into a marked `<|im_start|>`.
    pub fn occurs_in(&self, s: &str) -> bool {
        self.regex
            .as_ref()
            .is_some_and(|re| re.is_match(&drop_markers(s)))
    }

    /// The marked value, or `None` when marking changes nothing (most inputs), so unchanged
    /// structures are shared instead of rebuilt.
    fn mark_changed(&self, v: &Value) -> Option<Value> {
        match v.kind() {
            ValueKind::String => self.mark_str(v.as_str()?).map(Value::from),
            ValueKind::Seq => {
                let items: Vec<Value> = v.try_iter().ok()?.collect();
                let marked: Vec<Option<Value>> =
                    items.iter().map(|x| self.mark_changed(x)).collect();
                if marked.iter().all(Option::is_none) {
                    return None;
                }
                Some(Value::from(
                    items
                        .into_iter()
                        .zip(marked)
                        .map(|(old, new)| new.unwrap_or(old))
                        .collect::<Vec<_>>(),
                ))
            }
            ValueKind::Map => {
                let pairs = map_pairs(v);
                let marked: Vec<Option<Value>> =
                    pairs.iter().map(|(_, x)| self.mark_changed(x)).collect();
                if marked.iter().all(Option::is_none) {
                    return None;
                }
                Some(Value::from_pairs(
                    pairs
                        .into_iter()
                        .zip(marked)
                        .map(|((k, old), new)| (k, new.unwrap_or(old)))
                        .collect::<Vec<_>>(),
                ))
            }
            _ => None,
        }
    }

    fn mark_str(&self, s: &str) -> Option<String> {
        let text = drop_markers(s);
        let Some(re) = self.regex.as_ref().filter(|re| re.is_match(&text)) else {
            return match text {
                Cow::Owned(t) => Some(t),
                Cow::Borrowed(_) => None,
            };
        };
        let mut out = String::with_capacity(text.len() + 16);
        let mut last = 0;
        for m in re.find_iter(&text) {
            out.push_str(&text[last..m.start()]);
            out.push(MARK_START);
            out.push_str(m.as_str());
            out.push(MARK_END);
            last = m.end();
        }
        out.push_str(&text[last..]);
        Some(out)
    }
}

fn drop_markers(s: &str) -> Cow<'_, str> {
    if s.contains([MARK_START, MARK_END]) {
        Cow::Owned(s.replace([MARK_START, MARK_END], ""))
    } else {
        Cow::Borrowed(s)
    }
}

/// `_get_control_token_patterns`' first regex. Longest first (in code points, as Python's
/// `len`), so a token wins over the tokens it contains; the regex crate's leftmost-first
/// alternation then picks what Python's `re` picks.
fn control_regex(tokens: &[String]) -> Result<Option<Regex>> {
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut longest_first: Vec<&String> = tokens.iter().collect();
    longest_first.sort_by_key(|t| std::cmp::Reverse(t.chars().count()));
    let pattern = longest_first
        .iter()
        .map(|t| regex::escape(t))
        .collect::<Vec<_>>()
        .join("|");
    // Some tokenizers have tens of thousands of added tokens; the default size limit is for
    // hand-written patterns.
    regex::RegexBuilder::new(&pattern)
        .size_limit(1 << 30)
        .build()
        .map(Some)
        .map_err(|e| Error::Internal(format!("control-token regex: {e}")))
}

/// `_get_template_literal_text`: the template's raw text and its string constants, joined with
/// NULs so a token cannot match across two of them.
///
/// Read from minijinja's lexer, which handles whitespace control and `{% raw %}` as Jinja2's
/// lexer does (given the same source preparation the renderer applies), so its template-data
/// tokens are Jinja2's `TemplateData` nodes. Adjacent string literals are one constant, as in
/// both parsers (`'<|im_' 'end|>'`). Unknown tags like `{% generation %}` lex fine.
pub fn template_literal_text(source: &str) -> Result<String> {
    use minijinja::machinery::{tokenize, Token};
    let prepared = keep_newline_after_raw(&source.replace("\r\n", "\n").replace('\r', "\n"));
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("default delimiters are valid");
    let mut literals: Vec<String> = Vec::new();
    let mut in_string = false;
    for token in tokenize(&prepared, false, syntax) {
        let (token, _) = token.map_err(|e| Error::TemplateSyntax {
            detail: e
                .detail()
                .map(str::to_string)
                .unwrap_or_else(|| e.kind().to_string()),
            line: e.line(),
        })?;
        let (text, is_string): (&str, bool) = match &token {
            Token::TemplateData(s) => (s, false),
            Token::Str(s) => (s, true),
            Token::String(s) => (s, true),
            _ => {
                in_string = false;
                continue;
            }
        };
        match literals.last_mut() {
            Some(last) if is_string && in_string => last.push_str(text),
            _ => literals.push(text.to_string()),
        }
        in_string = is_string;
    }
    literals.sort_unstable();
    literals.dedup();
    Ok(literals.join("\0"))
}

/// The renderer's source preparation (see `template::keep_newline_after_raw`): Jinja2's
/// `trim_blocks` keeps the newline after `{% raw %}`, minijinja's eats it.
fn keep_newline_after_raw(source: &str) -> String {
    use std::sync::OnceLock;
    static RAW: OnceLock<Regex> = OnceLock::new();
    let raw = RAW.get_or_init(|| Regex::new(r"(\{%[-+]?\s*raw\s*%\})\n").expect("valid regex"));
    raw.replace_all(source, "${1}\n\n").into_owned()
}

/// One piece of a marked render, `encode_marked_chat`'s split. `start` is in code points of
/// the whole render.
enum Piece<'a> {
    /// Text outside marks.
    Text { text: &'a str, start: usize },
    /// A marked control token (markers excluded), with its id.
    Marked {
        token: &'a str,
        start: usize,
        id: u32,
    },
}

/// Converts increasing byte offsets of one text into code-point offsets in linear time.
struct CharPos<'a> {
    text: &'a str,
    byte: usize,
    chars: usize,
}

impl CharPos<'_> {
    fn at(&mut self, byte: usize) -> usize {
        self.chars += self.text[self.byte..byte].chars().count();
        self.byte = byte;
        self.chars
    }
}

/// Splits like `markers_re.split(chat)` with `markers_re` = `START(<any added token>)END|[START END]`:
/// a marked token is a START, an added token and an END; any other marker is lone and dropped,
/// but still ends the text piece before it.
///
/// Python's alternation can only close a mark at the first END after the START, since no added
/// token contains a marker character, so looking up the text up to that END as an added token
/// is the same match.
fn split_marked<'a>(tokenizer: &Tokenizer, text: &'a str) -> Vec<Piece<'a>> {
    // Both markers are 4 bytes in UTF-8.
    const W: usize = MARK_START.len_utf8();
    let added = tokenizer.get_added_vocabulary().get_vocab();
    let mut pos = CharPos {
        text,
        byte: 0,
        chars: 0,
    };
    let mut pieces = Vec::new();
    let mut piece_start = 0;
    // The first END at or after the last START's content (`usize::MAX`: none), found once per
    // END, so the scan stays linear even with many lone STARTs.
    let mut next_end = 0;
    while let Some(marker) = text[piece_start..]
        .find([MARK_START, MARK_END])
        .map(|i| piece_start + i)
    {
        pieces.push(Piece::Text {
            text: &text[piece_start..marker],
            start: pos.at(piece_start),
        });
        let inner = marker + W;
        piece_start = inner;
        if text[marker..].starts_with(MARK_START) {
            if next_end < inner {
                next_end = text[inner..]
                    .find(MARK_END)
                    .map_or(usize::MAX, |i| inner + i);
            }
            if let Some(&id) = text.get(inner..next_end).and_then(|token| added.get(token)) {
                pieces.push(Piece::Marked {
                    token: &text[inner..next_end],
                    start: pos.at(inner),
                    id,
                });
                piece_start = next_end + W;
            }
        }
    }
    pieces.push(Piece::Text {
        text: &text[piece_start..],
        start: pos.at(piece_start),
    });
    pieces
}

/// `_encode_without_added_tokens` of transformers' tokenizers backend: the whole text through
/// normalizer, pre-tokenizer and model, with no added-token matching at all. (The
/// tokenizers crate's `encode_special_tokens` would still match non-special added tokens.)
fn encode_plain(tokenizer: &Tokenizer, text: &str) -> Result<IdsAndOffsets> {
    let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
    let mut normalized = NormalizedString::from(text);
    if let Some(n) = tokenizer.get_normalizer() {
        n.normalize(&mut normalized).map_err(err)?;
    }
    let mut pretokenized = PreTokenizedString::from(normalized);
    if let Some(p) = tokenizer.get_pre_tokenizer() {
        p.pre_tokenize(&mut pretokenized).map_err(err)?;
    }
    let model = tokenizer.get_model();
    pretokenized
        .tokenize(|n| model.tokenize(n.get()))
        .map_err(err)?;
    let enc = pretokenized
        .into_encoding(None, 0, OffsetType::Char)
        .map_err(err)?;
    Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
}

/// `_encode_chat_piece`: encodes a piece after a newline, so a SentencePiece-style tokenizer
/// does not add the prefix space it adds at the start of a text, then drops the newline's
/// tokens; when the newline does not encode apart, encodes the piece alone. Offsets are made
/// relative to the piece.
fn encode_piece(
    encode: &dyn Fn(&str) -> Result<IdsAndOffsets>,
    piece: &str,
    newline_ids: &[u32],
) -> Result<IdsAndOffsets> {
    let (ids, offsets) = encode(&format!("\n{piece}"))?;
    if !ids.starts_with(newline_ids) {
        return encode(piece);
    }
    let n = newline_ids.len();
    let offsets = offsets[n..]
        .iter()
        .map(|&(s, e)| (s.saturating_sub(1), e.saturating_sub(1)))
        .collect();
    Ok((ids[n..].to_vec(), offsets))
}

/// `encode_marked_chat`: ids, and each token's (start, end) in code points of `text` itself
/// (marker characters stay in the coordinate system; no token covers a marker character).
///
/// Fails with transformers' ValueError text when plain text of a marked token encodes to the
/// token itself (the tokenizer could not tell the input's token from the template's).
pub fn encode_marked(encoder: &Encoder, text: &str) -> Result<IdsAndOffsets> {
    if !text.contains([MARK_START, MARK_END]) {
        // One piece, which transformers encodes plainly.
        return encoder.encode_with_char_offsets(text);
    }
    let tokenizer = encoder.tokenizer();
    let newline_ids = encoder.encode("\n")?;
    let normal = |s: &str| encoder.encode_with_char_offsets(s);
    let plain = |s: &str| encode_plain(tokenizer, s);
    let mut ids = Vec::new();
    let mut offsets = Vec::new();
    for (i, piece) in split_marked(tokenizer, text).into_iter().enumerate() {
        let (start, len, (piece_ids, piece_offsets)) = match piece {
            // The text before the first marker is encoded as it is, even when empty.
            Piece::Text { text, start } if i == 0 => (start, text.chars().count(), normal(text)?),
            Piece::Text { text: "", .. } => continue,
            Piece::Text { text, start } => (
                start,
                text.chars().count(),
                encode_piece(&normal, text, &newline_ids)?,
            ),
            Piece::Marked { token, start, id } => {
                let encoded = encode_piece(&plain, token, &newline_ids)?;
                if encoded.0.contains(&id) {
                    return Err(Error::Unsanitizable(format!(
                        "Can't sanitize {}: the tokenizer produces it from plain text",
                        py_str_repr(token)
                    )));
                }
                (start, token.chars().count(), encoded)
            }
        };
        ids.extend(piece_ids);
        offsets.extend(
            piece_offsets
                .into_iter()
                .map(|(s, e)| (start + s.min(len), start + e.min(len))),
        );
    }
    Ok((ids, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{self, DemoKind};
    use tokenizers::AddedToken;

    const S: char = MARK_START;
    const E: char = MARK_END;

    fn demo_encoder(kind: DemoKind) -> Encoder {
        demo::chat_tokenizer(kind).unwrap().encoder
    }

    /// The demo tokenizer plus non-special added tokens, some of which the template writes.
    fn encoder_with_added(kind: DemoKind, non_special: &[&str]) -> Encoder {
        let mut tok = demo_encoder(kind).tokenizer().clone();
        tok.add_tokens(non_special.iter().map(|t| AddedToken::from(*t, false)))
            .unwrap();
        Encoder::new(tok).unwrap()
    }

    fn json(v: serde_json::Value) -> Value {
        Value::from(minijinja::value::Serde(v))
    }

    fn marked(s: &str) -> String {
        format!("{S}{s}{E}")
    }

    #[test]
    fn control_tokens_are_specials_plus_template_literals() {
        let enc = encoder_with_added(
            DemoKind::ByteLevel,
            &["<think>", "</think>", "<tool_call>", "\n\n", "<unused>"],
        );
        let ctl = ControlTokens::new(&enc, demo::CHAT_TEMPLATE, None).unwrap();
        // "\n\n" occurs in the template but is whitespace; "<unused>" does not occur.
        assert_eq!(
            ctl.tokens(),
            [
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<think>",
                "</think>",
                "<tool_call>"
            ]
        );

        let listed = ["<think>".to_string(), "<unused>".into(), "not added".into()];
        let ctl = ControlTokens::new(&enc, demo::CHAT_TEMPLATE, Some(&listed)).unwrap();
        assert_eq!(
            ctl.tokens(),
            [
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<think>",
                "<unused>"
            ]
        );
    }

    #[test]
    fn literal_text_follows_jinja2() {
        let src = "{# <a> #}A{{ '<b' '>' }}{% raw %}\n<c>{% endraw %}  {%- if x == \"<d>\" %}\r\n  <e>{% endif %}\n";
        // As Jinja2 sees it: no comment, `-` strips before its tag, trim_blocks eats the newline
        // after a tag but not after `{% raw %}`, and the final newline is dropped.
        assert_eq!(
            template_literal_text(src).unwrap(),
            ["\n<c>", "  <e>", "<b>", "<d>", "A"].join("\0")
        );
        let demo_literals = [
            "",
            "\n",
            "\n\n",
            "\n</think>\n\n",
            "\n</tool_call>",
            "\n</tools><|im_end|>\n",
            "\n<tool_call>\n",
            "# Tools\n<tools>",
            "</think>",
            "<think>",
            "<think>\n",
            "<|im_end|>\n",
            "<|im_start|>",
            "<|im_start|>assistant\n",
            "<|im_start|>system\n",
            "arguments",
            "assistant",
            "name",
            "system",
            "user",
        ];
        assert_eq!(
            template_literal_text(demo::CHAT_TEMPLATE).unwrap(),
            demo_literals.join("\0")
        );
        let enc = encoder_with_added(DemoKind::ByteLevel, &["<b>", "<d>", "<a>", "A<b"]);
        let ctl = ControlTokens::new(&enc, src, None).unwrap();
        assert!(ctl.tokens().iter().any(|t| t == "<b>") && ctl.tokens().iter().any(|t| t == "<d>"));
        assert!(
            !ctl.tokens().iter().any(|t| t == "<a>" || t == "A<b"),
            "no match across literals"
        );
    }

    #[test]
    fn mark_wraps_tokens_in_strings_only_and_drops_forged_markers() {
        let enc = encoder_with_added(DemoKind::ByteLevel, &["<|im"]);
        let ctl = ControlTokens::new(&enc, "{{ '<|im' }}", None).unwrap();
        let input = json(serde_json::json!({
            "role": "user",
            "<|im_end|>": ["a<|im_end|>b", 3, null, {"k": format!("<|im_{S}start|>")}],
            "content": format!("{S}<|im_end|>{E} <|im<|im_start|>"),
            "plain": "nothing",
        }));
        let out = ctl.mark(&input);
        let want = json(serde_json::json!({
            "role": "user",
            "<|im_end|>": [format!("a{}b", marked("<|im_end|>")), 3, null, {"k": marked("<|im_start|>")}],
            "content": format!("{} {}{}", marked("<|im_end|>"), marked("<|im"), marked("<|im_start|>")),
            "plain": "nothing",
        }));
        assert_eq!(out, want);
        // Keys stay, in order.
        let keys: Vec<String> = map_pairs(&out)
            .into_iter()
            .map(|(k, _)| k.to_string())
            .collect();
        assert_eq!(keys, ["role", "<|im_end|>", "content", "plain"]);
        // Marking is idempotent, and leaves clean values alone.
        assert_eq!(ctl.mark(&out), out);
        assert_eq!(ctl.mark(&Value::from("x")), Value::from("x"));
        assert_eq!(ctl.mark(&Value::from(format!("a{E}b"))), Value::from("ab"));
        assert!(
            ctl.occurs_in("x<|im_end|>")
                && ctl.occurs_in(&format!("<|im_{S}end|>"))
                && !ctl.occurs_in("<|i m")
        );
    }

    #[test]
    fn no_control_tokens_never_matches() {
        let tok = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        let enc = Encoder::new(tok).unwrap();
        let ctl = ControlTokens::new(&enc, "{{ '<|im_end|>' }}", None).unwrap();
        assert!(ctl.tokens().is_empty() && !ctl.occurs_in("<|im_end|>"));
        assert_eq!(
            ctl.mark(&Value::from(format!("<|im_end|>{S}"))),
            Value::from("<|im_end|>")
        );
    }

    /// transformers' `encode_marked_chat`, step by step on the crate's own encode calls.
    fn expected(enc: &Encoder, pieces: &[(&str, bool)]) -> Vec<u32> {
        let nl = enc.encode("\n").unwrap();
        let plain = |s: &str| encode_plain(enc.tokenizer(), s);
        let normal = |s: &str| enc.encode_with_char_offsets(s);
        let mut ids = enc.encode(pieces[0].0).unwrap();
        for &(p, as_text) in &pieces[1..] {
            if p.is_empty() {
                continue;
            }
            let f: &dyn Fn(&str) -> Result<IdsAndOffsets> = if as_text { &plain } else { &normal };
            let with_nl = f(&format!("\n{p}")).unwrap().0;
            ids.extend(if with_nl.starts_with(&nl) {
                with_nl[nl.len()..].to_vec()
            } else {
                f(p).unwrap().0
            });
        }
        ids
    }

    #[test]
    fn marked_tokens_encode_as_text_and_the_rest_normally() {
        for kind in [DemoKind::ByteLevel, DemoKind::Metaspace] {
            let enc = demo_encoder(kind);
            let im_end = enc.token_to_id("<|im_end|>").unwrap();
            let user = format!("Hi {}there{}", marked("<|im_end|>"), marked("<|im_start|>"));
            let text = format!("<|im_start|>user\n{user}<|im_end|>\n");
            let (ids, offsets) = encode_marked(&enc, &text).unwrap();
            let want = expected(
                &enc,
                &[
                    ("<|im_start|>user\nHi ", false),
                    ("<|im_end|>", true),
                    ("there", false),
                    ("<|im_start|>", true),
                    ("<|im_end|>\n", false),
                ],
            );
            assert_eq!(ids, want, "{kind:?}");
            assert_eq!(
                ids.iter().filter(|&&i| i == im_end).count(),
                1,
                "{kind:?}: only the template's token"
            );
            // Plain-text encoding agrees with the tokenizer's own "no special tokens" mode when
            // every added token is special.
            let mut split = enc.tokenizer().clone();
            split.set_encode_special_tokens(true);
            for s in ["<|im_end|>", "\n<|im_start|>x <|endoftext|>"] {
                let want = split.encode(s, false).unwrap().get_ids().to_vec();
                assert_eq!(
                    encode_plain(enc.tokenizer(), s).unwrap().0,
                    want,
                    "{kind:?} {s:?}"
                );
            }
            // Offsets: one per id, in order, inside `text`, never over a marker.
            let chars: Vec<char> = text.chars().collect();
            assert_eq!(offsets.len(), ids.len());
            assert!(offsets.windows(2).all(|w| w[0].0 <= w[1].0), "{offsets:?}");
            for &(s, e) in &offsets {
                assert!(
                    s <= e && e <= chars.len() && !chars[s..e].iter().any(|&c| c == S || c == E),
                    "{kind:?} {s}..{e}"
                );
            }
        }
    }

    #[test]
    fn lone_markers_are_dropped_but_split_the_text() {
        for kind in [DemoKind::ByteLevel, DemoKind::Metaspace] {
            let enc = demo_encoder(kind);
            let im_start = enc.token_to_id("<|im_start|>").unwrap();
            // A template's `split('<|im_end|>')` separates the markers around a token.
            let text = format!("a {S}<|im_end|>b{E}c<|im_{S}start|>d{S}{S}<|im_start|>{E}{E}");
            let (ids, offsets) = encode_marked(&enc, &text).unwrap();
            let want = expected(
                &enc,
                &[
                    ("a ", false),
                    ("", true),
                    ("<|im_end|>b", false),
                    ("", true),
                    ("c<|im_", false),
                    ("", true),
                    ("start|>d", false),
                    ("", true),
                    ("", false),
                    ("<|im_start|>", true),
                    ("", false),
                    ("", true),
                    ("", false),
                ],
            );
            assert_eq!(ids, want, "{kind:?}");
            assert!(
                !ids.contains(&im_start),
                "{kind:?}: the lone marker keeps `<|im_` and `start|>` apart"
            );
            assert_eq!(offsets.len(), ids.len());
            // Without markers it is the plain encoding.
            assert_eq!(
                encode_marked(&enc, "x<|im_end|>").unwrap(),
                enc.encode_with_char_offsets("x<|im_end|>").unwrap()
            );
            // A mark around something that is not an added token is two lone markers.
            let (ids, _) = encode_marked(&enc, &format!("q{S}<|im_end|> {E}r")).unwrap();
            assert_eq!(
                ids,
                expected(
                    &enc,
                    &[
                        ("q", false),
                        ("", true),
                        ("<|im_end|> ", false),
                        ("", true),
                        ("r", false)
                    ]
                )
            );
        }
    }

    #[test]
    fn token_produced_from_plain_text_cannot_be_sanitized() {
        let base = demo_encoder(DemoKind::ByteLevel);
        // A vocabulary word the BPE produces on its own, registered as a special token.
        let word = ["the", "user", "Paris"]
            .into_iter()
            .find(|w| base.encode(&format!("\n{w}")).unwrap().len() == 2)
            .expect("a whole-word token");
        let mut tok = base.tokenizer().clone();
        tok.add_special_tokens([AddedToken::from(word, true)])
            .unwrap();
        let enc = Encoder::new(tok).unwrap();
        let ctl = ControlTokens::new(&enc, demo::CHAT_TEMPLATE, None).unwrap();
        let text = ctl
            .mark(&Value::from(format!("say {word}")))
            .as_str()
            .unwrap()
            .to_string();
        let err = encode_marked(&enc, &text).unwrap_err();
        assert_eq!(
            err,
            Error::Unsanitizable(format!(
                "Can't sanitize '{word}': the tokenizer produces it from plain text"
            ))
        );
    }

    /// The directory `tests/_sanitize_expect.py` wrote, if `CHATMASK_SANITIZE_EXPECT` names it.
    fn expect_dir(file: &str) -> Option<std::path::PathBuf> {
        let Some(dir) = std::env::var_os("CHATMASK_SANITIZE_EXPECT") else {
            eprintln!(
                "skipped: set CHATMASK_SANITIZE_EXPECT to the output of tests/_sanitize_expect.py"
            );
            return None;
        };
        Some(std::path::Path::new(&dir).join(file))
    }

    fn jsonl(path: &std::path::Path) -> impl Iterator<Item = serde_json::Value> {
        use std::io::BufRead;
        let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        std::io::BufReader::new(file)
            .lines()
            .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
    }

    /// A fixture tokenizer with its config's `chat_control_tokens`.
    fn load(dir: &str) -> (crate::core::ChatTokenizer, Option<Vec<String>>) {
        let tok = crate::core::ChatTokenizer::from_dir(
            std::path::Path::new(dir),
            crate::encode::EncoderChoice::Auto,
        )
        .unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(std::path::Path::new(dir).join("tokenizer_config.json"))
                .unwrap(),
        )
        .unwrap();
        let listed = config
            .get("chat_control_tokens")
            .and_then(|v| v.as_array())
            .map(|items| {
                items
                    .iter()
                    .map(|t| {
                        t.as_str()
                            .expect("chat_control_tokens are strings")
                            .to_string()
                    })
                    .collect()
            });
        (tok, listed)
    }

    #[test]
    fn template_literals_match_jinja2() {
        let Some(path) = expect_dir("literals.jsonl") else {
            return;
        };
        let (mut same, mut both_refused, mut differ) = (0, 0, Vec::new());
        for row in jsonl(&path) {
            let name = row["template"].as_str().unwrap();
            let got = template_literal_text(&std::fs::read_to_string(name).unwrap());
            match (row.get("literals").and_then(|l| l.as_array()), got) {
                (Some(want), Ok(got)) => {
                    let want = want
                        .iter()
                        .map(|s| s.as_str().unwrap())
                        .collect::<Vec<_>>()
                        .join("\0");
                    if want == got {
                        same += 1;
                    } else {
                        differ.push(format!("{name}: jinja2 {want:?}\n  chatmask {got:?}"));
                    }
                }
                (None, Err(_)) => both_refused += 1,
                (want, got) => differ.push(format!("{name}: jinja2 {want:?}, chatmask {got:?}")),
            }
        }
        eprintln!(
            "template literals: {same} equal, {both_refused} refused by both, {} differ",
            differ.len()
        );
        assert!(differ.is_empty(), "{}", differ.join("\n"));
    }

    #[test]
    fn control_tokens_match_transformers() {
        let Some(path) = expect_dir("control_tokens.jsonl") else {
            return;
        };
        let mut checked = 0;
        for row in jsonl(&path) {
            let dir = row["tokenizer_dir"].as_str().unwrap();
            let (tok, listed) = load(dir);
            let ctl = ControlTokens::new(
                &tok.encoder,
                row["template"].as_str().unwrap(),
                listed.as_deref(),
            )
            .unwrap();
            let want: Vec<&str> = row["control_tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            assert_eq!(ctl.tokens(), want, "{dir}");
            checked += 1;
        }
        eprintln!("control tokens: {checked} tokenizers equal");
    }

    /// Renders and encodes each injected row as transformers' `apply_chat_template(...,
    /// sanitize_control_tokens=True)` does, and compares ids (or the exception) with its output.
    #[test]
    fn sanitize_matches_transformers() {
        use std::collections::HashMap;
        let Some(path) = expect_dir("expect.jsonl") else {
            return;
        };
        let mut tokenizers: HashMap<String, (crate::core::ChatTokenizer, Option<Vec<String>>)> =
            HashMap::new();
        let mut controls: HashMap<(String, String), ControlTokens> = HashMap::new();
        let (mut rows, mut ids_compared, mut ids_differing, mut errors_matched) = (0, 0, 0, 0);
        let mut failures = Vec::new();
        for row in jsonl(&path) {
            rows += 1;
            let dir = row["tokenizer_dir"].as_str().unwrap().to_string();
            let (tok, listed) = tokenizers.entry(dir.clone()).or_insert_with(|| load(&dir));
            let tools = &row["tools"];
            let source = tok.template_source(None, !tools.is_null()).unwrap();
            let ctl = controls
                .entry((dir.clone(), source.clone()))
                .or_insert_with(|| {
                    ControlTokens::new(&tok.encoder, &source, listed.as_deref()).unwrap()
                });
            // transformers marks messages, tools and the template kwargs; the special tokens it adds
            // to the context afterwards stay unmarked.
            let got = (|| -> Result<Vec<u32>> {
                let messages = row["messages"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|m| ctl.mark(&json(m.clone())))
                    .collect();
                let conv = crate::chat::Conversation::new(messages)?;
                let mut kwargs: Vec<(String, Value)> = row["kwargs"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .filter(|(k, _)| *k != "add_generation_prompt")
                    .map(|(k, v)| (k.clone(), ctl.mark(&json(v.clone()))))
                    .collect();
                if !tools.is_null() {
                    kwargs.push(("tools".into(), ctl.mark(&json(tools.clone()))));
                }
                let args = tok.template_args(None, kwargs)?;
                let add_generation_prompt = row["kwargs"]["add_generation_prompt"]
                    .as_bool()
                    .unwrap_or(false);
                let text = tok.render(&conv, conv.len(), add_generation_prompt, &args)?;
                Ok(encode_marked(&tok.encoder, &text)?.0)
            })();
            let case = format!("{} {} row {}", row["tokenizer"], row["file"], row["row"]);
            match (row.get("expected_ids").and_then(|v| v.as_array()), got) {
                (Some(want), Ok(got)) => {
                    let want: Vec<u32> = want.iter().map(|i| i.as_u64().unwrap() as u32).collect();
                    let differing = want.iter().zip(&got).filter(|(a, b)| a != b).count()
                        + want.len().abs_diff(got.len());
                    ids_compared += want.len().min(got.len());
                    ids_differing += differing;
                    if differing > 0 {
                        let at = want
                            .iter()
                            .zip(&got)
                            .position(|(a, b)| a != b)
                            .unwrap_or(want.len().min(got.len()));
                        let window =
                            |v: &[u32]| v[at.saturating_sub(3)..(at + 5).min(v.len())].to_vec();
                        failures.push(format!(
                            "{case}: {differing} ids differ, first at {at}: want {:?} got {:?} (lengths {} / {})",
                            window(&want),
                            window(&got),
                            want.len(),
                            got.len()
                        ));
                    }
                }
                (None, got) => {
                    let want = &row["expected_error"];
                    let message = want["message"].as_str().unwrap();
                    let alike = match (want["type"].as_str().unwrap(), &got) {
                        ("ValueError", Err(Error::Unsanitizable(m))) => m == message,
                        ("TemplateError", Err(Error::TemplateRaised(m))) => m == message,
                        _ => false,
                    };
                    if alike {
                        errors_matched += 1;
                    } else {
                        failures.push(format!(
                            "{case}: transformers raised {want}, chatmask gave {:?}",
                            got.map(|ids| ids.len())
                        ));
                    }
                }
                (Some(_), Err(e)) => failures.push(format!(
                    "{case}: transformers encoded, chatmask raised {e:?}"
                )),
            }
        }
        eprintln!(
            "sanitize: {rows} rows, {ids_compared} ids compared, {ids_differing} differ, {errors_matched} errors matched, {} rows failed",
            failures.len()
        );
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
