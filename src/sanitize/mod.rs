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

use crate::encode::Encoder;
use crate::error::{Error, Result};
use crate::template::keep_newline_after_raw;
use crate::template::pyfmt::map_pairs;
use minijinja::value::{Value, ValueKind};
use regex::Regex;

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

mod encode;

pub use encode::encode_marked;

#[cfg(test)]
mod tests;
