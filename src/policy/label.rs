//! From a located render to labels: the trained character ranges of a [`Policy`], mapped to
//! tokens last (a token is trained when any of its characters lies in a trained range, as
//! transformers' generation masks do; a trained token that also covers characters outside every
//! trained range is counted as straddling).

use super::ranges::{inside, normalize, overlaps, subtract};
use super::{EndTokens, MessageInfo, Policy, SpanSource};

use crate::error::{Error, Result};
use crate::label::IGNORE;
use crate::spans::{FieldKind, FieldSpan};

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
    let owned = attribute(row, policy, eos, is_special)?;
    let trained_ranges = normalize(match policy.source {
        SpanSource::Generation => row.generation.to_vec(),
        SpanSource::Messages => message_ranges(row, policy, &owned.regions)?,
    });
    let mut trained = vec![false; ids.len()];
    let mut straddling = 0;
    for (t, on) in trained.iter_mut().enumerate() {
        if pos[t].0 < pos[t].1 && overlaps(&trained_ranges, pos[t]) {
            *on = true;
            straddling += usize::from(!inside(&trained_ranges, pos[t]));
        }
    }
    if policy.source == SpanSource::Messages {
        label_end_tokens(row, policy, eos, &owned.end_token, &mut trained);
    }
    let labels = ids
        .iter()
        .zip(&trained)
        .map(|(&id, &on)| if on { id as i64 } else { IGNORE })
        .collect();
    let straddles_start = owned
        .message_index
        .iter()
        .zip(pos.iter())
        .map(|(&m, &(s, _))| usize::try_from(m).is_ok_and(|m| s < owned.region_start[m]))
        .collect();
    Ok(Labels {
        labels,
        message_index: owned.message_index,
        straddles_start,
        straddling,
    })
}

/// What each message owns in a row: its characters, its tokens, its end token.
struct Owned {
    /// Per message, its character ranges (turn prefix, fields, text up to its end token).
    regions: Vec<Vec<(usize, usize)>>,
    /// Per message, where its region starts (its turn prefix or first segment).
    region_start: Vec<usize>,
    /// Per message, the end-of-turn token that closes it.
    end_token: Vec<Option<usize>>,
    /// Per token, the message that owns it (-1: template text).
    message_index: Vec<i32>,
}

/// Walks the row's segments in text order, giving each message its turn prefix, its fields and
/// the text up to its end token, and each token the message whose region it lies in.
fn attribute(
    row: &SpanRow<'_>,
    policy: &Policy,
    eos: Option<u32>,
    is_special: &dyn Fn(u32) -> bool,
) -> Result<Owned> {
    let (ids, pos) = (row.ids, row.positions);
    let n_tokens = ids.len();
    let segs = segments(row.spans);
    let token_starting_at = |c: usize| pos.partition_point(|&(s, _)| s < c);
    let token_ending_after = |c: usize| pos.partition_point(|&(_, e)| e <= c);
    let n_messages = row.messages.len();
    let mut owned = Owned {
        regions: vec![Vec::new(); n_messages],
        region_start: vec![usize::MAX; n_messages],
        end_token: vec![None; n_messages],
        message_index: vec![-1i32; n_tokens],
    };
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
        let region = &mut owned.regions[seg.message];
        let mut start = seg.start;
        if let (true, Some((prompt, offsets))) = (first_seg[seg.message] == k, &char_bytes) {
            let prefix = TurnPrefix {
                row,
                segs: &segs,
                k,
                prompt,
                offsets,
            };
            if let Some(prefix_start) = prefix
                .start(boundary, after_end_token)
                .filter(|&p| p < seg.start)
            {
                start = prefix_start;
                region.push((prefix_start, seg.start));
            }
        }
        region.push((seg.start, seg.end));
        owned.region_start[seg.message] = owned.region_start[seg.message].min(start);
        let first = token_ending_after(start);
        for (mi, p) in owned.message_index[first..].iter_mut().zip(&pos[first..]) {
            if p.0 >= seg.end {
                break;
            }
            *mi = seg.message as i32;
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
                owned.end_token[seg.message] = Some(t);
                (boundary, after_end_token) = (pos[t].1, true);
                if pos[t].0 > seg.end {
                    region.push((seg.end, pos[t].0));
                }
                for mi in &mut owned.message_index[from..=t] {
                    if *mi < 0 {
                        *mi = seg.message as i32;
                    }
                }
                break;
            }
        }
    }
    Ok(owned)
}

/// The turn prefix of the message whose first segment is `segs[k]`: the generation prompt
/// (`prompt`) before it, found in the text since the previous message's output ended.
struct TurnPrefix<'a> {
    row: &'a SpanRow<'a>,
    segs: &'a [Segment],
    k: usize,
    prompt: &'a str,
    /// The byte offset of every code point of the render.
    offsets: &'a [usize],
}

impl TurnPrefix<'_> {
    /// Where the message's own output starts: where the generation prompt before it ends,
    /// with no turn header after it (after an empty turn, the gap holds that turn's
    /// scaffolding). `boundary`: where the previous message's output ended.
    fn start(&self, boundary: usize, after_end_token: bool) -> Option<usize> {
        let (row, seg) = (self.row, self.segs[self.k]);
        let from = boundary.min(seg.start);
        if self.prompt.is_empty() {
            // An empty prompt (Mistral's) opens an assistant turn right after the previous
            // message's end token, when no empty message lies in between.
            let follows_previous = self.k.checked_sub(1).map_or(seg.message == 0, |prev| {
                self.segs[prev].message + 1 == seg.message
            });
            let assistant = row
                .messages
                .get(seg.message)
                .and_then(|m| m.role.as_deref())
                == Some("assistant");
            return (assistant && after_end_token && follows_previous).then_some(from);
        }
        let pos = row.positions;
        let gap = &row.text[self.offsets[from]..self.offsets[seg.start]];
        gap.rfind(self.prompt)
            .map(|at| from + gap[..at + self.prompt.len()].chars().count())
            .filter(|&p| {
                let first = pos.partition_point(|&(_, e)| e <= p);
                let last = pos.partition_point(|&(s, _)| s < seg.start);
                !row.ids[first..last]
                    .iter()
                    .any(|id| row.opener_ids.contains(id))
            })
    }
}

/// The character ranges the policy trains, from the messages' regions and fields.
fn message_ranges(
    row: &SpanRow<'_>,
    policy: &Policy,
    regions: &[Vec<(usize, usize)>],
) -> Result<Vec<(usize, usize)>> {
    let mut trained_ranges = Vec::new();
    let mut spans_of: Vec<Vec<&FieldSpan>> = vec![Vec::new(); row.messages.len()];
    for span in row.spans {
        spans_of[span.message].push(span);
    }
    for (m, info) in row.messages.iter().enumerate() {
        if !info.trained(policy) {
            continue;
        }
        if let Some(detail) = &info.detail {
            let Some(origin) = row.content_origin.get(m).copied().flatten() else {
                return Err(Error::InvalidInput(format!(
                    "message {m}: training_detail needs string content that the template prints as it is"
                )));
            };
            for span in spans_of[m].iter().filter(|s| s.kind == FieldKind::Content) {
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
        let ranges = normalize(regions[m].clone());
        if policy.train_reasoning {
            trained_ranges.extend(ranges);
        } else {
            let excluded = reasoning_ranges(&spans_of[m], ranges.first().map_or(0, |r| r.0));
            trained_ranges.extend(subtract(&ranges, &normalize(excluded)));
        }
    }
    Ok(trained_ranges)
}

/// A message's reasoning, to leave untrained: each reasoning field runs to the message's next
/// non-reasoning field (so its closing `</think>` goes with it), or to its own end; reasoning
/// that opens the message takes the template text before it (`<think>`, from `region_start`)
/// along.
fn reasoning_ranges(spans: &[&FieldSpan], region_start: usize) -> Vec<(usize, usize)> {
    let mut others: Vec<usize> = spans
        .iter()
        .filter(|s| s.kind != FieldKind::Reasoning)
        .map(|s| s.start)
        .collect();
    others.sort_unstable();
    spans
        .iter()
        .filter(|s| s.kind == FieldKind::Reasoning)
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
        .collect()
}

/// Each message's end token trained or not, as the policy's `train_on_eos` (the EOS) and
/// `train_on_eot` (other end tokens) say.
fn label_end_tokens(
    row: &SpanRow<'_>,
    policy: &Policy,
    eos: Option<u32>,
    end_token: &[Option<usize>],
    trained: &mut [bool],
) {
    let is_eos_class = |t: usize| Some(row.ids[t]) == eos;
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
        let option = if is_eos_class(t) {
            policy.train_on_eos
        } else {
            policy.train_on_eot
        };
        trained[t] = match option {
            EndTokens::None => false,
            EndTokens::Turn => row.messages[m].trained(policy),
            EndTokens::All => true,
            EndTokens::Last => last_of_class(is_eos_class(t)) == Some(t),
        };
    }
}

#[cfg(test)]
#[path = "label_tests.rs"]
mod tests;
