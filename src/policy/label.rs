//! From a located render to labels: the trained character ranges of a [`Policy`], mapped to
//! tokens last (a token is trained when any of its characters lies in a trained range, as
//! transformers' generation masks do; a trained token that also covers characters outside every
//! trained range is counted as straddling), and `fit_length`'s limits.

use super::{EndTokens, MessageInfo, Overflow, Policy, SpanSource};

use crate::error::{Error, Result};
use crate::label::IGNORE;
use crate::spans::{FieldKind, FieldSpan};

/// The per-row result.
#[derive(Debug, Clone, Default)]
pub struct Tokenized {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub message_index: Vec<i32>,
    /// Per token: it carries a message's index but starts before that message's region, so it
    /// also covers text before the message (a merge across the boundary where it begins).
    pub straddles_start: Vec<bool>,
    /// Trained tokens that also cover characters outside every trained range.
    pub straddling: usize,
    /// Whether token positions came from the tokens themselves (not the tokenizer's offsets).
    pub positions_derived: bool,
    /// Tokens removed by truncation.
    pub truncated: usize,
    /// Whether an input string held a control token's text (sanitized or not).
    pub control_found: bool,
}

/// Sorted, non-overlapping character ranges.
fn normalize(mut ranges: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    ranges.retain(|(s, e)| s < e);
    ranges.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// `a` minus `b` (both normalized).
fn subtract(a: &[(usize, usize)], b: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &(mut s, e) in a {
        for &(bs, be) in b {
            if be <= s || bs >= e {
                continue;
            }
            if bs > s {
                out.push((s, bs));
            }
            s = s.max(be);
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

/// Index of the first range ending after `c`.
fn first_ending_after(ranges: &[(usize, usize)], c: usize) -> usize {
    ranges.partition_point(|&(_, e)| e <= c)
}

fn overlaps(ranges: &[(usize, usize)], (ts, te): (usize, usize)) -> bool {
    let i = first_ending_after(ranges, ts);
    ranges.get(i).is_some_and(|&(s, _)| s < te)
}

fn inside(ranges: &[(usize, usize)], (ts, te): (usize, usize)) -> bool {
    let i = first_ending_after(ranges, ts);
    ranges.get(i).is_some_and(|&(s, e)| s <= ts && te <= e)
}

/// A run of spans of one message with no other message's span between them: the text in
/// between (a `</think>`, a tool-call opener) is that message's too.
#[derive(Debug, Clone, Copy)]
struct Segment {
    message: usize,
    start: usize,
    end: usize,
}

fn segments(spans: &[FieldSpan]) -> Vec<Segment> {
    let mut sorted: Vec<&FieldSpan> = spans.iter().filter(|s| s.start < s.end).collect();
    sorted.sort_by_key(|s| (s.start, s.end));
    let mut out: Vec<Segment> = Vec::new();
    for s in sorted {
        match out.last_mut() {
            Some(seg) if seg.message == s.message => seg.end = seg.end.max(s.end),
            _ => out.push(Segment {
                message: s.message,
                start: s.start,
                end: s.end,
            }),
        }
    }
    out
}

/// Everything the labeller needs about one rendered, encoded row.
pub struct SpanRow<'a> {
    /// The plain render.
    pub text: &'a str,
    /// What `add_generation_prompt=True` appends after a one-message conversation, if known.
    pub generation_prompt: Option<&'a str>,
    /// The special tokens of the generation prompt: they open turns, never end them.
    pub opener_ids: &'a [u32],
    pub ids: &'a [u32],
    pub positions: &'a [(usize, usize)],
    pub spans: &'a [FieldSpan],
    pub messages: &'a [MessageInfo],
    /// Where each message's string content starts inside its span (leading whitespace the
    /// markers went inside of); `None` where the content was not located by markers.
    pub content_origin: &'a [Option<usize>],
    /// `{% generation %}` spans, for [`SpanSource::Generation`].
    pub generation: &'a [(usize, usize)],
}

/// The byte offset of every code point of `text`, and of its end.
fn char_byte_offsets(text: &str) -> Vec<usize> {
    text.char_indices()
        .map(|(b, _)| b)
        .chain(std::iter::once(text.len()))
        .collect()
}

/// What [`label`] computes for one row.
pub struct Labels {
    pub labels: Vec<i64>,
    pub message_index: Vec<i32>,
    /// See [`Tokenized::straddles_start`].
    pub straddles_start: Vec<bool>,
    pub straddling: usize,
}

/// Labels, `message_index` and the tokens straddling a message's start, for one row.
pub fn label(
    row: &SpanRow<'_>,
    policy: &Policy,
    eos: Option<u32>,
    is_special: &dyn Fn(u32) -> bool,
) -> Result<Labels> {
    let (ids, pos) = (row.ids, row.positions);
    let n_tokens = ids.len();
    let mut message_index = vec![-1i32; n_tokens];
    let segs = segments(row.spans);
    let token_starting_at = |c: usize| pos.partition_point(|&(s, _)| s < c);
    let token_ending_after = |c: usize| pos.partition_point(|&(_, e)| e <= c);

    // Each message's character region, and the end token that closes it.
    let n_messages = row.messages.len();
    let mut regions: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n_messages];
    // Where each message's region starts (its turn prefix or first segment).
    let mut region_start = vec![usize::MAX; n_messages];
    let mut end_token: Vec<Option<usize>> = vec![None; n_messages];
    let is_end = |id: u32| match &policy.eot_tokens {
        Some(list) => list.contains(&id) || Some(id) == eos,
        // A special token the generation prompt holds opens turns (`<|im_start|>`), even
        // where a template leaves a turn unclosed (SmolLM3's system block).
        None => is_special(id) && !row.opener_ids.contains(&id),
    };
    let char_bytes = row
        .generation_prompt
        .filter(|_| policy.train_turn_prefix)
        .map(|g| (g, char_byte_offsets(row.text)));
    // Where the text after the previous message ends: its last segment, or its end token
    // (then `after_end_token`).
    let mut boundary = 0usize;
    let mut after_end_token = false;
    // Each message's first and last segment, so a long conversation stays linear.
    let mut first_seg = vec![usize::MAX; n_messages];
    let mut last_seg = vec![0usize; n_messages];
    for (k, seg) in segs.iter().enumerate() {
        if seg.message >= n_messages {
            return Err(Error::Internal(format!(
                "span of message {} beyond the conversation",
                seg.message
            )));
        }
        first_seg[seg.message] = first_seg[seg.message].min(k);
        last_seg[seg.message] = k;
    }
    for (k, seg) in segs.iter().enumerate() {
        let region = &mut regions[seg.message];
        let mut start = seg.start;
        if let (true, Some((prompt, offsets))) = (first_seg[seg.message] == k, &char_bytes) {
            // The message's own output starts where the generation prompt before it ends, and
            // holds no turn header (after an empty turn, the gap holds that turn's scaffolding).
            let from = boundary.min(seg.start);
            let gap = &row.text[offsets[from]..offsets[seg.start]];
            let prefix_start = if prompt.is_empty() {
                // An empty prompt (Mistral's) opens an assistant turn right after the previous
                // message's end token, when no empty message lies in between.
                let follows_previous = k.checked_sub(1).map_or(seg.message == 0, |prev| {
                    segs[prev].message + 1 == seg.message
                });
                let assistant = row
                    .messages
                    .get(seg.message)
                    .and_then(|m| m.role.as_deref())
                    == Some("assistant");
                (assistant && after_end_token && follows_previous).then_some(from)
            } else {
                gap.rfind(prompt)
                    .map(|at| from + gap[..at + prompt.len()].chars().count())
                    .filter(|&p| {
                        let tokens = token_ending_after(p)..token_starting_at(seg.start);
                        !ids[tokens].iter().any(|id| row.opener_ids.contains(id))
                    })
            };
            if let Some(prefix_start) = prefix_start.filter(|&p| p < seg.start) {
                start = prefix_start;
                region.push((prefix_start, seg.start));
            }
        }
        region.push((seg.start, seg.end));
        region_start[seg.message] = region_start[seg.message].min(start);
        for t in token_ending_after(start)..n_tokens {
            if pos[t].0 >= seg.end {
                break;
            }
            message_index[t] = seg.message as i32;
        }
        if seg.end > boundary {
            (boundary, after_end_token) = (seg.end, false);
        }
        if last_seg[seg.message] != k {
            continue;
        }
        // The end token: the first end-of-turn token after the message's last field, before
        // any other message's text. What lies between (a tool call's closing `}`) is the
        // message's own output.
        let limit = segs.get(k + 1).map_or(usize::MAX, |next| next.start);
        let from = token_starting_at(seg.end);
        for t in from..n_tokens {
            if pos[t].0 >= limit {
                break;
            }
            if is_end(ids[t]) {
                end_token[seg.message] = Some(t);
                (boundary, after_end_token) = (pos[t].1, true);
                if pos[t].0 > seg.end {
                    region.push((seg.end, pos[t].0));
                }
                for mi in &mut message_index[from..=t] {
                    if *mi < 0 {
                        *mi = seg.message as i32;
                    }
                }
                break;
            }
        }
    }

    let mut trained_ranges: Vec<(usize, usize)> = Vec::new();
    match policy.source {
        SpanSource::Generation => trained_ranges.extend_from_slice(row.generation),
        SpanSource::Messages => {
            let mut spans_of: Vec<Vec<&FieldSpan>> = vec![Vec::new(); n_messages];
            for span in row.spans {
                spans_of[span.message].push(span);
            }
            for (m, info) in row.messages.iter().enumerate() {
                if !info.trained(policy) {
                    continue;
                }
                let own =
                    |kind: FieldKind| spans_of[m].iter().copied().filter(move |s| s.kind == kind);
                if let Some(detail) = &info.detail {
                    let Some(origin) = row.content_origin.get(m).copied().flatten() else {
                        return Err(Error::InvalidInput(format!(
                            "message {m}: training_detail needs string content that the template prints as it is"
                        )));
                    };
                    for span in own(FieldKind::Content) {
                        for &(b, e, train) in detail {
                            if train {
                                let s = (span.start + b).saturating_sub(origin).max(span.start);
                                let e = (span.start + e + 1).saturating_sub(origin).min(span.end);
                                trained_ranges.push((s, e));
                            }
                        }
                    }
                    continue;
                }
                let mut ranges = normalize(regions[m].clone());
                if !policy.train_reasoning {
                    // Reasoning runs to the next non-reasoning field of the message (so its
                    // closing `</think>` goes with it), or to its own end.
                    let mut others: Vec<usize> = spans_of[m]
                        .iter()
                        .filter(|s| s.kind != FieldKind::Reasoning)
                        .map(|s| s.start)
                        .collect();
                    others.sort_unstable();
                    // Reasoning that opens the message takes the template text before it
                    // (`<think>`) along.
                    let region_start = ranges.first().map_or(0, |r| r.0);
                    let excluded: Vec<(usize, usize)> = own(FieldKind::Reasoning)
                        .map(|r| {
                            let next = others
                                .iter()
                                .copied()
                                .find(|&o| o >= r.end)
                                .unwrap_or(r.end);
                            let opens = !others.iter().any(|&o| o < r.start);
                            (
                                if opens {
                                    region_start.min(r.start)
                                } else {
                                    r.start
                                },
                                next,
                            )
                        })
                        .collect();
                    ranges = subtract(&ranges, &normalize(excluded));
                }
                trained_ranges.extend(ranges);
            }
        }
    }
    let trained_ranges = normalize(trained_ranges);

    let mut trained = vec![false; n_tokens];
    let mut straddling = 0;
    for t in 0..n_tokens {
        if pos[t].0 < pos[t].1 && overlaps(&trained_ranges, pos[t]) {
            trained[t] = true;
            straddling += usize::from(!inside(&trained_ranges, pos[t]));
        }
    }

    if policy.source == SpanSource::Messages {
        let option = |t: usize| {
            if Some(ids[t]) == eos {
                policy.train_on_eos
            } else {
                policy.train_on_eot
            }
        };
        let is_eos_class = |t: usize| Some(ids[t]) == eos;
        let last_of_class = |eos_class: bool| {
            end_token
                .iter()
                .flatten()
                .copied()
                .filter(|&t| is_eos_class(t) == eos_class)
                .max()
        };
        for (m, t) in end_token.iter().enumerate() {
            let Some(t) = *t else { continue };
            trained[t] = match option(t) {
                EndTokens::None => false,
                EndTokens::Turn => row.messages[m].trained(policy),
                EndTokens::All => true,
                EndTokens::Last => last_of_class(is_eos_class(t)) == Some(t),
            };
        }
    }
    let labels = ids
        .iter()
        .zip(&trained)
        .map(|(&id, &on)| if on { id as i64 } else { IGNORE })
        .collect();
    let straddles_start = message_index
        .iter()
        .zip(pos.iter())
        .map(|(&m, &(s, _))| usize::try_from(m).is_ok_and(|m| s < region_start[m]))
        .collect();
    Ok(Labels {
        labels,
        message_index,
        straddles_start,
        straddling,
    })
}

/// Applies `max_length`. `Ok(false)`: drop the row.
pub fn fit_length(out: &mut Tokenized, policy: &Policy) -> Result<bool> {
    let Some(max) = policy.max_length else {
        return Ok(true);
    };
    let len = out.input_ids.len();
    if len <= max {
        return Ok(true);
    }
    let keep = match policy.overflow {
        Overflow::Error => {
            return Err(Error::TooLong(format!("{len} tokens, max_length is {max}")))
        }
        Overflow::Drop => return Ok(false),
        Overflow::TruncateRight => 0..max,
        Overflow::TruncateLeft => {
            let Some(last) = out.labels.iter().rposition(|&l| l != IGNORE) else {
                return Err(Error::TooLong(format!(
                    "{len} tokens, max_length {max}, and no trained token to keep"
                )));
            };
            // The last trained message: its first trained token.
            let message = out.message_index[last];
            let first = if message >= 0 {
                (0..=last)
                    .find(|&t| out.message_index[t] == message && out.labels[t] != IGNORE)
                    .unwrap_or(last)
            } else {
                (0..=last)
                    .rev()
                    .take_while(|&t| out.labels[t] != IGNORE)
                    .last()
                    .unwrap_or(last)
            };
            // Untrained tokens after the target go first, then context from the left.
            let end = if len - first <= max { len } else { last + 1 };
            if end - first > max {
                return Err(Error::TooLong(format!(
                    "the last trained span alone is {} tokens, max_length is {max}",
                    end - first
                )));
            }
            end - max..end
        }
    };
    out.truncated = len - keep.len();
    out.input_ids = out.input_ids[keep.clone()].to_vec();
    out.labels = out.labels[keep.clone()].to_vec();
    out.message_index = out.message_index[keep.clone()].to_vec();
    if !out.straddles_start.is_empty() {
        out.straddles_start = out.straddles_start[keep].to_vec();
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::CharSpans;
    use crate::spans::FieldKind;

    fn span(message: usize, kind: FieldKind, start: usize, end: usize) -> FieldSpan {
        FieldSpan {
            message,
            kind,
            start,
            end,
        }
    }

    #[test]
    fn ranges_subtract_and_merge() {
        assert_eq!(
            normalize(vec![(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]),
            vec![(0, 3), (5, 9)]
        );
        assert_eq!(
            subtract(&[(0, 10)], &[(2, 4), (6, 8)]),
            vec![(0, 2), (4, 6), (8, 10)]
        );
        assert_eq!(subtract(&[(0, 3), (5, 9)], &[(0, 6)]), vec![(6, 9)]);
    }

    /// "U: hi<E>A: ok<E>" with one token per character, `<E>` a special token at 5 and 11.
    fn row_fixture() -> (Vec<u32>, CharSpans, Vec<FieldSpan>, Vec<MessageInfo>) {
        let text = "U: hi#A: ok#";
        let ids: Vec<u32> = text
            .chars()
            .map(|c| if c == '#' { 999 } else { c as u32 })
            .collect();
        let pos: Vec<(usize, usize)> = (0..text.len()).map(|i| (i, i + 1)).collect();
        let spans = vec![
            span(0, FieldKind::Content, 3, 5),
            span(1, FieldKind::Content, 9, 11),
        ];
        let info = vec![
            MessageInfo {
                role: Some("user".into()),
                ..Default::default()
            },
            MessageInfo {
                role: Some("assistant".into()),
                ..Default::default()
            },
        ];
        (ids, pos, spans, info)
    }

    fn run(policy: &Policy, info: &[MessageInfo]) -> (Vec<i64>, Vec<i32>) {
        let (ids, pos, spans, _) = row_fixture();
        let text = "U: hi#A: ok#";
        let row = SpanRow {
            text,
            generation_prompt: Some("A: "),
            opener_ids: &[],
            ids: &ids,
            positions: &pos,
            spans: &spans,
            messages: info,
            content_origin: &[Some(0), Some(0)],
            generation: &[],
        };
        let Labels {
            labels,
            message_index: mi,
            ..
        } = label(&row, policy, None, &|id| id == 999).unwrap();
        (labels, mi)
    }

    #[test]
    fn a_token_merged_across_a_message_start_straddles_it() {
        // "U: hi#A: ok#" with ": o" (characters 7..10) one token: the assistant's region starts
        // after the generation prompt "A: " (at 9), so that token also covers prompt text.
        let text = "U: hi#A: ok#";
        let mut pos: Vec<(usize, usize)> = (0..7).map(|i| (i, i + 1)).collect();
        pos.extend([(7, 10), (10, 11), (11, 12)]);
        let ids: Vec<u32> = pos
            .iter()
            .map(|&(s, _)| if s == 5 || s == 11 { 999 } else { s as u32 })
            .collect();
        let (_, _, spans, info) = row_fixture();
        let row = SpanRow {
            text,
            generation_prompt: Some("A: "),
            opener_ids: &[],
            ids: &ids,
            positions: &pos,
            spans: &spans,
            messages: &info,
            content_origin: &[Some(0), Some(0)],
            generation: &[],
        };
        let out = label(&row, &Policy::default(), None, &|id| id == 999).unwrap();
        assert_eq!(out.message_index, vec![-1, -1, -1, 0, 0, 0, -1, 1, 1, 1]);
        let straddling: Vec<usize> = (0..pos.len()).filter(|&t| out.straddles_start[t]).collect();
        assert_eq!(straddling, vec![7]);
        // One token per character: nothing straddles.
        let (ids, pos, spans, info) = row_fixture();
        let row = SpanRow {
            ids: &ids,
            positions: &pos,
            spans: &spans,
            messages: &info,
            ..row
        };
        let out = label(&row, &Policy::default(), None, &|id| id == 999).unwrap();
        assert!(!out.straddles_start.iter().any(|&s| s));
    }

    fn trained(labels: &[i64]) -> Vec<usize> {
        labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l != IGNORE)
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn assistant_content_and_its_end_token() {
        let (_, _, _, info) = row_fixture();
        let (labels, mi) = run(&Policy::default(), &info);
        assert_eq!(trained(&labels), vec![9, 10, 11]);
        assert_eq!(mi, vec![-1, -1, -1, 0, 0, 0, -1, -1, -1, 1, 1, 1]);
        let none = Policy {
            train_on_eot: EndTokens::None,
            ..Policy::default()
        };
        assert_eq!(trained(&run(&none, &info).0), vec![9, 10]);
        let all = Policy {
            train_on_eot: EndTokens::All,
            ..Policy::default()
        };
        assert_eq!(trained(&run(&all, &info).0), vec![5, 9, 10, 11]);
        let inputs = Policy {
            train_on_inputs: true,
            ..Policy::default()
        };
        assert_eq!(trained(&run(&inputs, &info).0), vec![3, 4, 5, 9, 10, 11]);
    }

    #[test]
    fn per_message_overrides() {
        let (_, _, _, mut info) = row_fixture();
        info[1].training = Some(false);
        info[0].detail = Some(vec![(1, 1, true)]);
        assert_eq!(trained(&run(&Policy::default(), &info).0), vec![4, 5]);
    }

    #[test]
    fn truncate_left_keeps_the_target() {
        let mut out = Tokenized {
            input_ids: (0..10).collect(),
            labels: vec![
                IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 6, 7, IGNORE, IGNORE,
            ],
            message_index: vec![0, 0, 0, 0, 1, 1, 1, 1, 1, -1],
            ..Default::default()
        };
        let policy = Policy {
            max_length: Some(5),
            overflow: Overflow::TruncateLeft,
            ..Policy::default()
        };
        assert!(fit_length(&mut out, &policy).unwrap());
        assert_eq!(out.input_ids, vec![5, 6, 7, 8, 9]);
        let mut short = Tokenized {
            input_ids: vec![0, 1, 2],
            labels: vec![IGNORE, 1, 2],
            message_index: vec![0, 1, 1],
            ..Default::default()
        };
        let tight = Policy {
            max_length: Some(1),
            overflow: Overflow::TruncateLeft,
            ..Policy::default()
        };
        assert!(matches!(
            fit_length(&mut short, &tight),
            Err(Error::TooLong(_))
        ));
        let drop = Policy {
            overflow: Overflow::Drop,
            ..tight
        };
        assert!(!fit_length(&mut short, &drop).unwrap());
    }
}
