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
            for (k, x) in map_pairs(v) {
                for_each_string(&k, f);
                for_each_string(&x, f);
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
            let hex = source.get(i + 2..i + 2 + width).and_then(|h| u32::from_str_radix(h, 16).ok());
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
            .ok_or_else(|| Error::InvalidInput("every span-marker character U+FDD0..U+FDEF occurs in the input".into()))
    }
}

/// Removes the markers and returns the text and the spans `(start, end)` in code points, in
/// the order the blocks closed (AssistantTracker's order).
pub fn strip_markers(marked: &str, (start, end): (char, char)) -> Result<(String, Vec<(usize, usize)>)> {
    let mut text = String::with_capacity(marked.len());
    let mut open = Vec::new();
    let mut spans = Vec::new();
    let mut pos = 0usize;
    for c in marked.chars() {
        if c == start {
            open.push(pos);
        } else if c == end {
            let s = open.pop().ok_or_else(|| Error::Internal("generation end marker without start".into()))?;
            spans.push((s, pos));
        } else {
            text.push(c);
            pos += 1;
        }
    }
    if !open.is_empty() {
        return Err(Error::Internal("generation start marker without end".into()));
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
        let (text, spans) = strip_markers("é\u{FDD0}ab\u{FDD0}c\u{FDD1}\u{FDD1}d", ('\u{FDD0}', '\u{FDD1}')).unwrap();
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
        assert_eq!(token_mask(&offsets, &[(0, 1), (10, 11)]), vec![1, 0, 0, 0, 0, 1]);
        assert_eq!(token_mask(&offsets, &[(3, 3)]), vec![0; 6]);
    }

    #[test]
    fn zero_width_token_between_touching_spans_is_not_trained() {
        // Found by the `spans` fuzz target: merging spans that only touch marked the
        // zero-width token (9, 9) at their seam, which neither span contains.
        let offsets = [(0, 2), (2, 5), (5, 6), (6, 9), (9, 9), (9, 12)];
        assert_eq!(token_mask(&offsets, &[(6, 9), (9, 12)]), vec![0, 0, 0, 1, 0, 1]);
        // Overlapping spans still cover it.
        assert_eq!(token_mask(&offsets, &[(6, 10), (8, 12)]), vec![0, 0, 0, 1, 1, 1]);
    }
}
