//! Marker characters in and out: how `{% generation %}` blocks become character spans.
//!
//! The renderer wraps each block's output in a pair of Unicode noncharacters chosen to be
//! absent from the template and from every input string, so every marker in the output is one
//! the renderer wrote. Stripping them yields the plain render and the spans, in Python code
//! points as transformers' AssistantTracker reports them.

use minijinja::value::{Value, ValueKind};

use crate::error::{Error, Result};
use crate::template::pyfmt::map_pairs;

/// Noncharacters U+FDD0..U+FDEF: 16 candidate (start, end) pairs.
const FIRST: u32 = 0xFDD0;
const PAIRS: u32 = 16;

fn is_candidate(c: char) -> bool {
    (FIRST..FIRST + 2 * PAIRS).contains(&(c as u32))
}

/// Calls `f` on every string inside `v` (map keys included).
pub fn for_each_string(v: &Value, f: &mut dyn FnMut(&str)) {
    match v.kind() {
        ValueKind::String => f(v.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            if let Ok(items) = v.try_iter() {
                items.for_each(|item| for_each_string(&item, f));
            }
        }
        ValueKind::Map => {
            // Walked in place: this runs over every input of every row.
            if let Some(pairs) = v.as_object().and_then(|o| o.try_iter_pairs()) {
                for (k, x) in pairs {
                    for_each_string(&k, f);
                    for_each_string(&x, f);
                }
            }
        }
        _ => {}
    }
}

/// Tracks which candidate marker characters occur in the inputs.
#[derive(Default)]
pub struct MarkerPicker {
    seen: u32,
}

impl MarkerPicker {
    pub fn see(&mut self, s: &str) {
        // Noncharacters are three UTF-8 bytes starting 0xEF 0xB7; skip the char walk otherwise.
        if !s.as_bytes().windows(2).any(|w| w == [0xEF, 0xB7]) {
            return;
        }
        for c in s.chars().filter(|&c| is_candidate(c)) {
            self.seen |= 1 << ((c as u32 - FIRST) / 2);
        }
    }

    /// Sees a template source: its characters, and those its string-literal escapes
    /// (`\uFDD0`, `\U0000FDD0`) write, which do not occur in the source as themselves.
    pub fn see_template(&mut self, source: &str) {
        self.see(source);
        let bytes = source.as_bytes();
        for (i, _) in source.match_indices('\\') {
            let width = match bytes.get(i + 1) {
                Some(b'u') => 4,
                Some(b'U') => 8,
                _ => continue,
            };
            let hex = source
                .get(i + 2..i + 2 + width)
                .and_then(|h| u32::from_str_radix(h, 16).ok());
            if let Some(c) = hex.and_then(char::from_u32).filter(|&c| is_candidate(c)) {
                self.seen |= 1 << ((c as u32 - FIRST) / 2);
            }
        }
    }

    /// The first pair neither of whose characters occurs in what was seen.
    pub fn pick(&self) -> Result<(char, char)> {
        (0..PAIRS)
            .find(|k| self.seen & (1 << k) == 0)
            .map(|k| {
                let start = char::from_u32(FIRST + 2 * k).expect("noncharacters are chars");
                let end = char::from_u32(FIRST + 2 * k + 1).expect("noncharacters are chars");
                (start, end)
            })
            .ok_or_else(|| {
                Error::InvalidInput(
                    "every span-marker character U+FDD0..U+FDEF occurs in the input".into(),
                )
            })
    }
}

/// Removes the markers and returns the text and the spans `(start, end)` in code points, in
/// the order the blocks closed (AssistantTracker's order).
pub fn strip_markers(
    marked: &str,
    (start, end): (char, char),
) -> Result<(String, Vec<(usize, usize)>)> {
    let mut text = String::with_capacity(marked.len());
    let mut open = Vec::new();
    let mut spans = Vec::new();
    let mut pos = 0usize;
    for c in marked.chars() {
        if c == start {
            open.push(pos);
        } else if c == end {
            let s = open
                .pop()
                .ok_or_else(|| Error::Internal("generation end marker without start".into()))?;
            spans.push((s, pos));
        } else {
            text.push(c);
            pos += 1;
        }
    }
    if !open.is_empty() {
        return Err(Error::Internal(
            "generation start marker without end".into(),
        ));
    }
    Ok((text, spans))
}

/// Tokens that have at least one character inside a span: the assistant mask.
///
/// transformers maps each span's first and last characters to tokens and marks the range
/// between; on contiguous offsets that is the same set. Unlike transformers, a span whose first
/// character maps to no token does not end the marking of every later span, and a span ending
/// in token 0 does not mark to the end of the sequence.
pub fn token_mask(char_offsets: &[(usize, usize)], spans: &[(usize, usize)]) -> Vec<u8> {
    let mut sorted: Vec<(usize, usize)> = spans.iter().copied().filter(|(s, e)| s < e).collect();
    sorted.sort_unstable();
    // Merge overlapping spans so each token needs one binary search. Spans that only touch
    // stay apart: a zero-width token at the seam lies in neither (transformers marks each
    // span's own token range), and merging would mark it.
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(sorted.len());
    for (s, e) in sorted {
        match merged.last_mut() {
            Some(last) if s < last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    char_offsets
        .iter()
        .map(|&(ts, te)| {
            // The first merged span ending after the token starts; trained if it starts before the token ends.
            let i = merged.partition_point(|&(_, e)| e <= ts);
            u8::from(merged.get(i).is_some_and(|&(s, _)| s < te))
        })
        .collect()
}

/// Which of a message's text fields a span comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// `content` (a string, or the `text` of content parts).
    Content,
    /// `reasoning_content` / `thinking` / `reasoning`.
    Reasoning,
    /// A tool call's function name and arguments.
    Tool,
}

const KINDS: [FieldKind; 3] = [FieldKind::Content, FieldKind::Reasoning, FieldKind::Tool];

/// Message-field markers live in plane 16's private use area (transformers' control-token
/// sanitizer uses plane 15): one start character per (message, field kind), one end character.
const FIELD_FIRST: u32 = 0x10_0000;
const FIELD_END: char = '\u{10FFFD}';
/// Start characters available: U+100000..U+10FFFC.
const FIELD_SLOTS: usize = (0x10FFFD - FIELD_FIRST) as usize;

/// The most messages a conversation can have for the one-render span method.
pub const MAX_MARKED_MESSAGES: usize = FIELD_SLOTS / KINDS.len();

/// Where one field of one message landed in the render (code points of the plain render).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpan {
    pub message: usize,
    pub kind: FieldKind,
    pub start: usize,
    pub end: usize,
}

/// Whether `s` holds a plane-16 character, which would collide with the field markers.
/// Its UTF-8 starts with byte 0xF4, which nothing below U+100000 uses.
pub fn has_plane16(s: &str) -> bool {
    s.as_bytes().contains(&0xF4)
}

/// Which fields to wrap and how.
#[derive(Debug, Clone, Copy)]
pub struct Marking {
    /// Only this message, or every message.
    pub message: Option<usize>,
    /// Only this field kind, or every kind.
    pub kind: Option<FieldKind>,
    /// Put the markers inside leading and trailing whitespace, so templates that `trim` or
    /// `strip` a field still leave the markers around what they print.
    pub inner: bool,
}

impl Marking {
    fn selects(&self, message: usize, kind: FieldKind) -> bool {
        self.message.is_none_or(|m| m == message) && self.kind.is_none_or(|k| k == kind)
    }
}

fn start_char(message: usize, kind: FieldKind) -> char {
    let slot = (message * KINDS.len() + kind as usize) as u32;
    char::from_u32(FIELD_FIRST + slot).expect("plane-16 code points are chars")
}

fn wrap(s: &str, start: char, inner: bool) -> String {
    let (lead, core, trail) = if inner {
        let core = s.trim_start_matches(char::is_whitespace);
        let lead = &s[..s.len() - core.len()];
        let trimmed = core.trim_end_matches(char::is_whitespace);
        (lead, trimmed, &core[trimmed.len()..])
    } else {
        ("", s, "")
    };
    let mut out = String::with_capacity(s.len() + 8);
    out.push_str(lead);
    out.push(start);
    out.push_str(core);
    out.push(FIELD_END);
    out.push_str(trail);
    out
}

/// Wraps every non-empty string inside `v` (values, not keys) for `wrap_str`.
fn wrap_deep(v: &Value, wrap_str: &dyn Fn(&str) -> Value) -> Value {
    match v.kind() {
        ValueKind::String => {
            let s = v.as_str().unwrap_or_default();
            if s.trim().is_empty() {
                v.clone()
            } else {
                wrap_str(s)
            }
        }
        ValueKind::Seq => match v.try_iter() {
            Ok(items) => Value::from(items.map(|x| wrap_deep(&x, wrap_str)).collect::<Vec<_>>()),
            Err(_) => v.clone(),
        },
        ValueKind::Map => Value::from_pairs(
            map_pairs(v)
                .into_iter()
                .map(|(k, x)| (k, wrap_deep(&x, wrap_str)))
                .collect::<Vec<_>>(),
        ),
        _ => v.clone(),
    }
}

/// Applies `f` to the values of the given keys of a map (other pairs untouched).
fn map_keys(v: &Value, keys: &[&str], f: &dyn Fn(&Value) -> Value) -> Value {
    if v.kind() != ValueKind::Map {
        return v.clone();
    }
    Value::from_pairs(
        map_pairs(v)
            .into_iter()
            .map(|(k, x)| {
                let hit = k.as_str().is_some_and(|name| keys.contains(&name));
                let x = if hit { f(&x) } else { x };
                (k, x)
            })
            .collect::<Vec<_>>(),
    )
}

/// A message with the selected text fields wrapped in markers. Only what the model writes is
/// wrapped: content (strings and the `text` of content parts), reasoning, and each tool call's
/// function name and arguments; never roles, ids or types, which templates compare.
pub fn mark_message(msg: &Value, index: usize, marking: Marking) -> Value {
    let wrapper = |kind: FieldKind| {
        let start = start_char(index, kind);
        move |s: &str| Value::from(wrap(s, start, marking.inner))
    };
    let pairs = map_pairs(msg)
        .into_iter()
        .map(|(k, v)| {
            let kind = match k.as_str() {
                Some("content") => FieldKind::Content,
                Some("reasoning_content" | "thinking" | "reasoning") => FieldKind::Reasoning,
                Some("tool_calls") => FieldKind::Tool,
                _ => return (k, v),
            };
            if !marking.selects(index, kind) {
                return (k, v);
            }
            let w = wrapper(kind);
            let v = match kind {
                FieldKind::Content if v.kind() == ValueKind::Seq => match v.try_iter() {
                    Ok(parts) => Value::from(
                        parts
                            .map(|p| map_keys(&p, &["text"], &|t| wrap_deep(t, &w)))
                            .collect::<Vec<_>>(),
                    ),
                    Err(_) => v,
                },
                FieldKind::Content | FieldKind::Reasoning if v.kind() == ValueKind::String => {
                    wrap_deep(&v, &w)
                }
                FieldKind::Tool => match v.try_iter() {
                    Ok(calls) if v.kind() == ValueKind::Seq => Value::from(
                        calls
                            .map(|call| {
                                let call =
                                    map_keys(&call, &["name", "arguments"], &|x| wrap_deep(x, &w));
                                map_keys(&call, &["function"], &|f| {
                                    map_keys(f, &["name", "arguments"], &|x| wrap_deep(x, &w))
                                })
                            })
                            .collect::<Vec<_>>(),
                    ),
                    _ => v,
                },
                _ => v,
            };
            (k, v)
        })
        .collect::<Vec<_>>();
    Value::from_pairs(pairs)
}

/// Removes the field markers: the text, and each marked field's span in code points. `None`
/// when the markers do not pair up (the template cut a field, so this render cannot be used).
pub fn strip_field_markers(marked: &str) -> Option<(String, Vec<FieldSpan>)> {
    let mut text = String::with_capacity(marked.len());
    let spans = walk_markers(marked, |chunk| {
        text.push_str(chunk);
        true
    })?;
    Some((text, spans))
}

/// Each marked field's span in code points, when `marked` without its markers is `plain`
/// (else `None`): [`strip_field_markers`] compared as it goes, building no text.
pub fn field_spans_in(marked: &str, plain: &str) -> Option<Vec<FieldSpan>> {
    let mut rest = plain.as_bytes();
    let spans = walk_markers(marked, |chunk| match rest.strip_prefix(chunk.as_bytes()) {
        Some(after) => {
            rest = after;
            true
        }
        None => false,
    })?;
    rest.is_empty().then_some(spans)
}

/// Walks `marked`, handing each run of text between markers to `text` (which may stop the walk
/// by returning false) and pairing the markers into spans; `None` when stopped or when the
/// markers do not pair up. The inputs hold no plane-16 character (checked before marking), so
/// every UTF-8 lead byte 0xF4 starts a marker.
fn walk_markers(marked: &str, mut text: impl FnMut(&str) -> bool) -> Option<Vec<FieldSpan>> {
    let bytes = marked.as_bytes();
    let mut open: Vec<(u32, usize)> = Vec::new();
    let mut spans = Vec::new();
    let (mut at, mut pos) = (0usize, 0usize);
    loop {
        let next = memchr::memchr(0xF4, &bytes[at..]).map_or(bytes.len(), |i| at + i);
        let chunk = &marked[at..next];
        if !text(chunk) {
            return None;
        }
        // Code points: every byte that is not a UTF-8 continuation byte.
        pos += chunk.bytes().filter(|&b| b & 0xC0 != 0x80).count();
        let Some(c) = marked[next..].chars().next() else {
            break;
        };
        let code = c as u32;
        if c == FIELD_END {
            let (slot, start) = open.pop()?;
            spans.push(FieldSpan {
                message: slot as usize / KINDS.len(),
                kind: KINDS[slot as usize % KINDS.len()],
                start,
                end: pos,
            });
        } else if (FIELD_FIRST..FIELD_FIRST + FIELD_SLOTS as u32).contains(&code) {
            open.push((code - FIELD_FIRST, pos));
        } else {
            return None; // a plane-16 character that is no marker: never in the inputs
        }
        at = next + c.len_utf8();
    }
    open.is_empty().then_some(spans)
}

/// The character that replaces a field in the diff method: absent from every input.
pub fn dummy_char(message: usize, kind: FieldKind) -> char {
    start_char(message, kind)
}

/// A message with the given field kind replaced by `dummy` (every string the marking would wrap).
pub fn replace_field(msg: &Value, index: usize, kind: FieldKind, dummy: &str) -> Value {
    let marked = mark_message(
        msg,
        index,
        Marking {
            message: Some(index),
            kind: Some(kind),
            inner: false,
        },
    );
    // Replace each wrapped string wholesale: map the marked strings back through a walk that
    // swaps any string holding this field's start character.
    let start = start_char(index, kind);
    fn swap(v: &Value, start: char, dummy: &str) -> Value {
        match v.kind() {
            ValueKind::String if v.as_str().is_some_and(|s| s.contains(start)) => {
                Value::from(dummy)
            }
            ValueKind::Seq => match v.try_iter() {
                Ok(items) => Value::from(items.map(|x| swap(&x, start, dummy)).collect::<Vec<_>>()),
                Err(_) => v.clone(),
            },
            ValueKind::Map => Value::from_pairs(
                map_pairs(v)
                    .into_iter()
                    .map(|(k, x)| (k, swap(&x, start, dummy)))
                    .collect::<Vec<_>>(),
            ),
            _ => v.clone(),
        }
    }
    swap(&marked, start, dummy)
}

/// The characters of `a` that differ from `b`: `(p, a_len - s)` in code points, where `p` is
/// the common prefix and `s` the common suffix (not overlapping the prefix).
pub fn diff_region(a: &str, b: &str) -> (usize, usize) {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let p = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let max_s = a.len().min(b.len()) - p;
    let s = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .take(max_s)
        .take_while(|(x, y)| x == y)
        .count();
    (p, a.len() - s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_avoid_input_characters() {
        let mut p = MarkerPicker::default();
        p.see("plain text");
        assert_eq!(p.pick().unwrap(), ('\u{FDD0}', '\u{FDD1}'));
        p.see("x\u{FDD1}y");
        assert_eq!(p.pick().unwrap(), ('\u{FDD2}', '\u{FDD3}'));
    }

    #[test]
    fn markers_avoid_characters_template_escapes_write() {
        // Found by the bad-input tests: `{{ '\ufdd0' }}` writes a marker the source does not contain.
        let mut p = MarkerPicker::default();
        p.see_template(r"{{ '\ufdd0' }}x{{ '\U0000FDD3' }}{{ '\u12' }}");
        assert_eq!(p.pick().unwrap(), ('\u{FDD4}', '\u{FDD5}'));
    }

    #[test]
    fn strip_counts_code_points_and_nests() {
        let (text, spans) = strip_markers(
            "é\u{FDD0}ab\u{FDD0}c\u{FDD1}\u{FDD1}d",
            ('\u{FDD0}', '\u{FDD1}'),
        )
        .unwrap();
        assert_eq!(text, "éabcd");
        assert_eq!(spans, vec![(3, 4), (1, 4)]);
        assert!(strip_markers("\u{FDD0}a", ('\u{FDD0}', '\u{FDD1}')).is_err());
    }

    #[test]
    fn mask_marks_overlapping_tokens_and_keeps_later_spans() {
        // tokens: [0,2) [2,5) [5,6) [6,9) [9,9) [9,12)
        let offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 9), (9, 12)];
        assert_eq!(token_mask(&offsets, &[(4, 6)]), vec![0, 1, 1, 0, 0, 0]);
        // A span starting inside a gap no token covers still marks what it overlaps,
        // and later spans are kept.
        assert_eq!(
            token_mask(&offsets, &[(0, 1), (10, 11)]),
            vec![1, 0, 0, 0, 0, 1]
        );
        assert_eq!(token_mask(&offsets, &[(3, 3)]), vec![0; 6]);
    }

    fn message(pairs: Vec<(&str, Value)>) -> Value {
        Value::from_pairs(pairs)
    }

    #[test]
    fn field_markers_round_trip_and_leave_roles_alone() {
        let call = message(vec![
            ("type", Value::from("function")),
            (
                "function",
                message(vec![
                    ("name", Value::from("f")),
                    ("arguments", message(vec![("x", Value::from("1 "))])),
                ]),
            ),
        ]);
        let msg = message(vec![
            ("role", Value::from("assistant")),
            ("content", Value::from("  hi ")),
            ("reasoning_content", Value::from("why")),
            ("tool_calls", Value::from(vec![call])),
        ]);
        for inner in [false, true] {
            let marked = mark_message(
                &msg,
                7,
                Marking {
                    message: None,
                    kind: None,
                    inner,
                },
            );
            let role = marked.get_attr("role").unwrap();
            assert_eq!(role.as_str(), Some("assistant"));
            let content = marked.get_attr("content").unwrap().to_string();
            let (text, spans) = strip_field_markers(&content).unwrap();
            assert_eq!(text, "  hi ");
            let want = if inner { (2, 4) } else { (0, 5) };
            assert_eq!(
                (
                    spans[0].message,
                    spans[0].kind,
                    spans[0].start,
                    spans[0].end
                ),
                (7, FieldKind::Content, want.0, want.1)
            );
            let tool = marked
                .get_attr("tool_calls")
                .unwrap()
                .get_item_by_index(0)
                .unwrap();
            assert_eq!(tool.get_attr("type").unwrap().as_str(), Some("function"));
            let name = tool
                .get_attr("function")
                .unwrap()
                .get_attr("name")
                .unwrap()
                .to_string();
            assert_eq!(
                strip_field_markers(&name).unwrap().1[0].kind,
                FieldKind::Tool
            );
        }
        // Unpaired markers (a template that cut a field) are refused.
        let cut: String = mark_message(
            &msg,
            0,
            Marking {
                message: None,
                kind: None,
                inner: false,
            },
        )
        .get_attr("content")
        .unwrap()
        .to_string()
        .chars()
        .skip(1)
        .collect();
        assert!(strip_field_markers(&format!("x{cut}")).is_none());
        assert!(field_spans_in(&format!("x{cut}"), "x").is_none());
    }

    #[test]
    fn field_spans_in_compares_as_it_strips() {
        let (a, b) = (
            start_char(0, FieldKind::Content),
            start_char(1, FieldKind::Tool),
        );
        let marked = format!("é<{a}ab{b}c{FIELD_END}{FIELD_END}>d{b}{FIELD_END}");
        let (text, spans) = strip_field_markers(&marked).unwrap();
        assert_eq!(text, "é<abc>d");
        assert_eq!(field_spans_in(&marked, &text), Some(spans.clone()));
        assert_eq!(
            spans
                .iter()
                .map(|s| (s.message, s.start, s.end))
                .collect::<Vec<_>>(),
            vec![(1, 4, 5), (0, 2, 5), (1, 7, 7)]
        );
        for other in ["é<abc>", "é<abc>dd", "é<abX>d", ""] {
            assert_eq!(field_spans_in(&marked, other), None, "{other}");
        }
    }

    #[test]
    fn diff_region_is_what_changed() {
        assert_eq!(diff_region("<a>hello</a>", "<a>\u{100000}</a>"), (3, 8));
        assert_eq!(diff_region("same", "same"), (4, 4));
        // Shared characters at both ends of the change are not counted twice.
        assert_eq!(diff_region("aXa", "aa"), (1, 2));
    }

    #[test]
    fn zero_width_token_between_touching_spans_is_not_trained() {
        // Found by the `spans` fuzz target: merging spans that only touch marked the
        // zero-width token (9, 9) at their seam, which neither span contains.
        let offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 9), (9, 12)];
        assert_eq!(
            token_mask(&offsets, &[(6, 9), (9, 12)]),
            vec![0, 0, 0, 1, 0, 1]
        );
        // Overlapping spans still cover it.
        assert_eq!(
            token_mask(&offsets, &[(6, 10), (8, 12)]),
            vec![0, 0, 0, 1, 1, 1]
        );
    }
}
