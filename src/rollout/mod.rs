//! RL rollouts: the token ids a server sampled for assistant messages, placed among the
//! template's tokens at the token boundaries of each message's text, never re-encoded.
//!
//! A sampled message's region ends at the token boundary where its last field ends (from the
//! located spans and the tokens' character positions) and starts at the token boundary, between
//! the previous message's text and its own first field, where the template's tokens decode to
//! the same text as the sampled ids. So text the model writes before the first field (Qwen3's
//! `<think>` block) belongs to the message. See `docs/rollouts.md`.

mod locate;

use std::ops::Range;

use crate::chat::Conversation;
use crate::core::{ChatTokenizer, Labelled, TemplateArgs};
use crate::encode::Encoded;
use crate::error::{Error, Result};
use crate::policy::Policy;

/// What became of a sampled message's trailing stop token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The sampled ids end in text.
    Absent,
    /// The template prints the same token after the message: it stands once.
    Consumed,
    /// The template prints no such token there: kept after the sampled ids, and trained.
    Kept,
    /// `finish_reason="length"`: generation was cut; nothing follows the sampled ids.
    Length,
}

impl Stop {
    /// How `sample`'s stop reads against a render's tokens `ids` whose text for it ends at
    /// token `end` (for a turn not placed, the render it was sampled after).
    fn of(sample: &Sample<'_>, ids: &[u32], end: usize) -> Stop {
        match sample.stop {
            None if sample.length => Stop::Length,
            None => Stop::Absent,
            Some(id) if ids.get(end) == Some(&id) => Stop::Consumed,
            Some(_) => Stop::Kept,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Stop::Absent => "absent",
            Stop::Consumed => "consumed",
            Stop::Kept => "kept",
            Stop::Length => "length",
        }
    }
}

/// One sampled message of a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub message: usize,
    /// Output tokens holding the sampled ids, a sampled stop token included (always trained).
    pub tokens: Range<usize>,
    /// Whether the template's own tokens for the message's text are the sampled ids.
    pub retokenized_same: bool,
    pub stop: Stop,
    /// Without a bridge: whether the full render holds the sampled text. False where the
    /// template rewrites the message as history (Qwen3 drops an earlier turn's reasoning): the
    /// output then has the template's tokens for it, untrained.
    pub placed: bool,
    /// After the first sampled turn: whether a fresh render of the prompt before this message
    /// starts with the previous prompt and its sampled ids.
    pub extends_previous: Option<bool>,
    /// With a bridge, after the first sampled turn: whether the bridged prompt differs from a
    /// fresh render of it (it then holds the sampled history the model saw, not the rewrite).
    pub bridge_differs: Option<bool>,
}

/// A rollout's tokens and labels, with a report per sampled message.
#[derive(Debug, Default)]
pub struct Rollout {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub message_index: Vec<i32>,
    pub turns: Vec<Turn>,
}

impl Rollout {
    /// Template tokens `range` of `from`, as the policy labelled them.
    fn copy(&mut self, from: &Labelled, range: Range<usize>) {
        let t = &from.tokenized;
        self.input_ids
            .extend_from_slice(&t.input_ids[range.clone()]);
        self.labels.extend_from_slice(&t.labels[range.clone()]);
        self.message_index
            .extend_from_slice(&t.message_index[range]);
    }

    /// Sampled ids of `message`, trained.
    fn push_sampled(&mut self, ids: &[u32], message: usize) {
        self.input_ids.extend_from_slice(ids);
        self.labels.extend(ids.iter().map(|&id| i64::from(id)));
        self.message_index
            .extend(std::iter::repeat_n(message as i32, ids.len()));
    }
}

/// What a rollout is asked for, besides the conversation.
pub struct RolloutRequest<'a> {
    /// One entry per assistant message, in order: the ids sampled for it, or None.
    pub completions: &'a [Option<Vec<u32>>],
    /// `finish_reason == "length"`: the last sampled message was cut before its stop token.
    pub length: bool,
    /// Build each prompt from the previous sequence instead of a fresh render.
    pub bridge: bool,
}

/// A sampled message being placed: its index, its ids without the stop token, the stop token.
#[derive(Clone, Copy)]
struct Sample<'a> {
    message: usize,
    /// Every id sampled for the message.
    ids: &'a [u32],
    body: &'a [u32],
    stop: Option<u32>,
    length: bool,
}

impl<'a> Sample<'a> {
    /// The same ids read with no stop token: a special token that ends the text itself (an
    /// unknown character's `<unk>`, say).
    fn without_stop(self) -> Option<Sample<'a>> {
        self.stop.map(|_| Sample {
            body: self.ids,
            stop: None,
            ..self
        })
    }
}

impl ChatTokenizer {
    /// Tokens and labels of a rollout: `conv`'s template tokens with the sampled ids of each
    /// sampled assistant message in place of that message's text tokens.
    pub fn tokenize_rollout(
        &self,
        conv: &Conversation,
        request: &RolloutRequest<'_>,
        policy: &Policy,
        args: &TemplateArgs,
    ) -> Result<Rollout> {
        let samples = self.samples(conv, request)?;
        if samples.first().is_some_and(|s| s.message == 0) {
            return Err(Error::Rollout(
                "message 0 is sampled, but no prompt precedes it to sample after".into(),
            ));
        }
        let out = if request.bridge {
            self.bridged(conv, &samples, policy, args)?
        } else {
            self.spliced(conv, &samples, policy, args)?
        };
        if let Some(max) = policy.max_length.filter(|&max| out.input_ids.len() > max) {
            return Err(Error::TooLong(format!(
                "the rollout has {} tokens, more than max_length {max}; rollouts are not cut",
                out.input_ids.len()
            )));
        }
        Ok(out)
    }

    fn samples<'a>(
        &self,
        conv: &Conversation,
        request: &RolloutRequest<'a>,
    ) -> Result<Vec<Sample<'a>>> {
        let assistants: Vec<usize> = (0..conv.len())
            .filter(|&i| {
                conv.messages[i]
                    .get_attr("role")
                    .ok()
                    .is_some_and(|r| r.as_str() == Some("assistant"))
            })
            .collect();
        if request.completions.len() != assistants.len() {
            return Err(Error::InvalidInput(format!(
                "completion_ids has {} entries and the conversation {} assistant messages; give one \
                 per assistant message (None for one that was not sampled)",
                request.completions.len(),
                assistants.len()
            )));
        }
        let sampled: Vec<(usize, &'a [u32])> = assistants
            .iter()
            .zip(request.completions)
            .filter_map(|(&m, ids)| ids.as_deref().map(|ids| (m, ids)))
            .collect();
        let last = sampled.len().saturating_sub(1);
        Ok(sampled
            .into_iter()
            .enumerate()
            .map(|(i, (message, ids))| {
                let length = request.length && i == last;
                let is_stop =
                    |id: u32| Some(id) == self.eos_token_id || self.encoder.is_special_added(id);
                match ids.split_last() {
                    Some((&stop, body)) if !length && is_stop(stop) => Sample {
                        message,
                        ids,
                        body,
                        stop: Some(stop),
                        length,
                    },
                    _ => Sample {
                        message,
                        ids,
                        body: ids,
                        stop: None,
                        length,
                    },
                }
            })
            .collect())
    }

    /// Appends `sample`'s ids to `out`, in place of `render`'s tokens `text` for its message.
    /// Returns the turn (without the multi-turn fields) and the template token to go on from.
    fn place(
        &self,
        out: &mut Rollout,
        render: &Labelled,
        sample: &Sample<'_>,
        text: Range<usize>,
    ) -> (Turn, usize) {
        let ids = &render.tokenized.input_ids;
        let start = out.input_ids.len();
        out.push_sampled(sample.body, sample.message);
        let stop = Stop::of(sample, ids, text.end);
        if let Some(id) = sample.stop {
            // Sampled, so trained either way; where the template prints it too, once.
            out.push_sampled(&[id], sample.message);
        }
        let next = match stop {
            Stop::Length => ids.len(),
            Stop::Consumed => text.end + 1,
            Stop::Absent | Stop::Kept => text.end,
        };
        let turn = Turn {
            message: sample.message,
            tokens: start..out.input_ids.len(),
            retokenized_same: ids[text] == *sample.body,
            stop,
            placed: true,
            extends_previous: None,
            bridge_differs: None,
        };
        (turn, next)
    }

    /// The ids of `conv[..n]` rendered with the generation prompt: `full`'s tokens up to the
    /// last added token the texts share and the rest encoded (exact: tokens do not merge
    /// across an added token), all encoded without `full`, or as `tokenize` encodes when the
    /// policy sanitizes control tokens.
    fn prompt_ids(
        &self,
        conv: &Conversation,
        n: usize,
        policy: &Policy,
        args: &TemplateArgs,
        full: Option<&Encoded>,
    ) -> Result<Vec<u32>> {
        if policy.sanitize_control_tokens {
            let prompt = self.tokenize_located(&conv.head(n), policy, true, args)?;
            return Ok(prompt.tokenized.input_ids);
        }
        let text = self.render(conv, n, true, args)?;
        match full {
            Some(full) => Ok(self.encoder.prefix_tokens(full, &text)?.to_vec()),
            None => self.encoder.encode(&text),
        }
    }

    /// The full render's tokens with each sampled region replaced (`bridge=False`).
    fn spliced(
        &self,
        conv: &Conversation,
        samples: &[Sample<'_>],
        policy: &Policy,
        args: &TemplateArgs,
    ) -> Result<Rollout> {
        let full = self.tokenize_located(conv, policy, false, args)?;
        let reuse = (samples.len() > 1 && !policy.sanitize_control_tokens)
            .then(|| {
                let ids = full.tokenized.input_ids.clone();
                self.encoder.encoded(full.located.text.clone(), ids)
            })
            .flatten();
        let mut out = Rollout::default();
        let mut cursor = 0;
        let mut previous: Option<Vec<u32>> = None;
        let mut unplaced = Vec::new();
        for sample in samples {
            // Only a later turn's prompt is compared with it: one sampled turn needs no prompt.
            let extends_previous = match samples.len() > 1 {
                true => {
                    let prompt =
                        self.prompt_ids(conv, sample.message, policy, args, reuse.as_ref())?;
                    let extends = previous.as_ref().map(|p| prompt.starts_with(p));
                    previous = Some([prompt, sample.ids.to_vec()].concat());
                    extends
                }
                false => None,
            };
            let turn = match self.find(&full, *sample)? {
                Some((text, sample)) => {
                    out.copy(&full, cursor..text.start);
                    let (turn, next) = self.place(&mut out, &full, &sample, text);
                    cursor = next;
                    turn
                }
                None => {
                    // Not in the full render: the ids must still be the message's text where
                    // it is the last message, the render it was sampled after.
                    let alone =
                        self.tokenize_located(&conv.head(sample.message + 1), policy, false, args)?;
                    let Some((text, sample)) = self.find(&alone, *sample)? else {
                        return Err(self.mismatch(&alone, sample));
                    };
                    unplaced.push(sample.message as i32);
                    Turn {
                        message: sample.message,
                        tokens: out.input_ids.len()..out.input_ids.len(),
                        stop: Stop::of(&sample, &alone.tokenized.input_ids, text.end),
                        retokenized_same: alone.tokenized.input_ids[text] == *sample.body,
                        placed: false,
                        extends_previous: None,
                        bridge_differs: None,
                    }
                }
            };
            out.turns.push(Turn {
                extends_previous,
                ..turn
            });
        }
        let end = full.tokenized.input_ids.len();
        out.copy(&full, cursor.min(end)..end);
        // The template's tokens for a message it rewrote are not what the policy sampled.
        for (label, m) in out.labels.iter_mut().zip(&out.message_index) {
            if unplaced.contains(m) {
                *label = -100;
            }
        }
        Ok(out)
    }

    /// Each prompt built from the previous sequence plus the template's own tokens for what
    /// follows the previous sampled message (`bridge=True`).
    fn bridged(
        &self,
        conv: &Conversation,
        samples: &[Sample<'_>],
        policy: &Policy,
        args: &TemplateArgs,
    ) -> Result<Rollout> {
        let full = self.tokenize_located(conv, policy, false, args)?;
        let mut out = Rollout::default();
        let mut after: Option<(usize, Option<u32>)> = None; // previous message, its consumed stop
        for sample in samples {
            let prompt = self.tokenize_located(&conv.head(sample.message), policy, true, args)?;
            let (extends_previous, bridge_differs) = match after {
                None => {
                    out.copy(&prompt, 0..prompt.tokenized.input_ids.len());
                    (None, None)
                }
                Some((previous, stop)) => {
                    let extends = prompt.tokenized.input_ids.starts_with(&out.input_ids);
                    let from = self.continue_after(&prompt, previous, stop)?;
                    out.copy(&prompt, from..prompt.tokenized.input_ids.len());
                    (
                        Some(extends),
                        Some(out.input_ids != prompt.tokenized.input_ids),
                    )
                }
            };
            // The text is checked in the full render, or where the message is the last one
            // when the full render rewrote it.
            let alone;
            let (render, text, sample) = match self.find(&full, *sample)? {
                Some((text, sample)) => (&full, text, sample),
                None => {
                    alone =
                        self.tokenize_located(&conv.head(sample.message + 1), policy, false, args)?;
                    let Some((text, sample)) = self.find(&alone, *sample)? else {
                        return Err(self.mismatch(&alone, sample));
                    };
                    (&alone, text, sample)
                }
            };
            let (turn, _) = self.place(&mut out, render, &sample, text);
            after = (turn.stop != Stop::Length).then_some((sample.message, sample.stop));
            out.turns.push(Turn {
                extends_previous,
                bridge_differs,
                ..turn
            });
        }
        let end = full.tokenized.input_ids.len();
        if let Some((previous, stop)) = after {
            let from = self.continue_after(&full, previous, stop)?;
            out.copy(&full, from..end);
        } else if samples.is_empty() {
            out.copy(&full, 0..end);
        }
        Ok(out)
    }

    /// The token of `render` after `message`'s text and, when it is the sampled stop token
    /// the sequence already holds, after that.
    fn continue_after(
        &self,
        render: &Labelled,
        message: usize,
        stop: Option<u32>,
    ) -> Result<usize> {
        let end = self.text_end(render, message)?;
        let ids = &render.tokenized.input_ids;
        Ok(match stop {
            Some(id) if ids.get(end) == Some(&id) => end + 1,
            _ => end,
        })
    }
}
