//! Mask truth at run time: a reference-mode row labelled with the reference's arithmetic and,
//! from the same render and the same tokens, judged on its message spans.
//!
//! The judge is the criterion of `benches/reference_errors.py`, as `chatmask.truth` words it:
//! the reference's mask is wrong when it leaves a targeted field's token untrained, trains a
//! token another message owns, trains a label that is not its token, or returns masks of another
//! length; "raises" when it fails where the spans work. The spans come from `ChatTokenizer::
//! tokenize`'s machinery under the caller's judging policy (Python's `truth.SPAN_POLICY`: the
//! assistant messages' fields, no end tokens), so the only work added to the reference pass is
//! locating the spans (one marked render) and one pass over the tokens.

use crate::chat::{Conversation, Role};
use crate::core::{ChatTokenizer, EncodedSpans, TemplateArgs};
use crate::error::Error;
use crate::label::{self, Labeled, Mode, IGNORE};
use crate::policy::{Policy, Tokenized};

/// Verdict bits, in `chatmask.truth.CAUSES` order after "raises".
pub const LENGTH: u8 = 1;
pub const UNTRAINED_TARGET_FIELD: u8 = 2;
pub const TRAINS_NON_TARGET: u8 = 4;
pub const LABEL_NOT_TOKEN: u8 = 8;
/// Not judged: the spans failed, or their tokens are not the reference's (a finish-reason cut).
pub const UNMEASURED: u8 = 0x80;

/// One reference-mode row with its verdict.
pub enum Judged {
    /// The reference's labels and the verdict bits (0: right).
    Labeled(Labeled, u8),
    /// The reference fails; `spans_work`: the span labels exist, so the row counts as "raises".
    Failed { error: Error, spans_work: bool },
}

impl ChatTokenizer {
    /// The reference's labels of `conv` (as [`ChatTokenizer::label`] gives them) and their
    /// verdict under `judge`, sharing the whole conversation's render and its tokens.
    pub fn label_judged(
        &self,
        conv: &Conversation,
        mode: Mode,
        finish_length: bool,
        args: &TemplateArgs,
        judge: &Policy,
    ) -> Judged {
        let failed = |error| Judged::Failed {
            error,
            spans_work: false,
        };
        if conv.is_empty() {
            return failed(Error::EmptyConversation);
        }
        let n = conv.len();
        let plain = match self.render(conv, n, false, args) {
            Ok(text) => text,
            Err(e) => return failed(e),
        };
        let located = self.locate(conv, plain.clone(), false, args);
        let (full, derived) = match self.encoder.encode_full_with_positions(plain) {
            Ok(encoded) => encoded,
            Err(e) => return failed(e),
        };
        let spans = located.ok().and_then(|located| {
            let (positions, positions_derived) = match derived {
                Some(p) => (p, true),
                None => {
                    let (ids, offsets) = self.encoder.encode_with_char_offsets(&full.text).ok()?;
                    (ids == full.ids).then_some((offsets, false))?
                }
            };
            let encoded = EncodedSpans {
                located: &located,
                generation: &[],
                ids: full.ids.clone(),
                positions: &positions,
                positions_derived,
            };
            self.label_spans(conv, encoded, judge, args).ok()
        });
        let render = |m: usize, gen: bool| self.render(conv, m, gen, args);
        let eos = self.eos_token_id;
        match label::label_encoded(
            &self.encoder,
            full,
            &render,
            &conv.roles,
            mode,
            finish_length,
            eos,
        ) {
            Ok(labeled) => {
                let verdict =
                    spans.map_or(UNMEASURED, |s| judge_row(&labeled, &s, &conv.roles, mode));
                Judged::Labeled(labeled, verdict)
            }
            Err(error) => Judged::Failed {
                error,
                spans_work: spans.is_some(),
            },
        }
    }
}

/// Which messages `mode` trains: every assistant turn (`all`), else the last one.
fn targets(roles: &[Role], mode: Mode) -> Vec<bool> {
    let mut out: Vec<bool> = roles.iter().map(|r| *r == Role::Unmasked).collect();
    if mode != Mode::All {
        let last = out.iter().rposition(|&t| t);
        out.iter_mut()
            .enumerate()
            .for_each(|(i, t)| *t = Some(i) == last);
    }
    out
}

/// The verdict bits of the reference's `labeled` against the span labels `spans`.
pub fn judge_row(labeled: &Labeled, spans: &Tokenized, roles: &[Role], mode: Mode) -> u8 {
    if labeled.tokens != spans.input_ids {
        return UNMEASURED;
    }
    let mut verdict = 0;
    if labeled.masks.len() != labeled.tokens.len() {
        verdict |= LENGTH; // judged on the masks padded or cut to the tokens' length
    }
    let targets = targets(roles, mode);
    for (k, &id) in labeled.tokens.iter().enumerate() {
        let label = labeled.masks.get(k).copied().unwrap_or(IGNORE);
        let trained = label != IGNORE;
        let message = usize::try_from(spans.message_index[k]).ok();
        let is_target = message.is_some_and(|m| targets.get(m).copied().unwrap_or(false));
        if spans.labels[k] != IGNORE && is_target && !trained {
            verdict |= UNTRAINED_TARGET_FIELD;
        }
        if trained && message.is_some() && !is_target {
            verdict |= TRAINS_NON_TARGET;
        }
        if trained && label != id as i64 {
            verdict |= LABEL_NOT_TOKEN;
        }
    }
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(ids: &[u32], labels: &[i64], index: &[i32]) -> Tokenized {
        Tokenized {
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            message_index: index.to_vec(),
            straddles_start: vec![false; ids.len()],
            straddling: 0,
            positions_derived: true,
            truncated: 0,
            control_found: false,
        }
    }

    fn labeled(tokens: &[u32], masks: &[i64]) -> Labeled {
        Labeled {
            tokens: tokens.to_vec(),
            masks: masks.to_vec(),
        }
    }

    const U: Role = Role::Other;
    const A: Role = Role::Unmasked;

    #[test]
    fn each_cause_is_named() {
        // Tokens: 10 user (message 0), 11 template text, 12 13 assistant (message 1; 12 a field).
        let s = spans(
            &[10, 11, 12, 13],
            &[IGNORE, IGNORE, 12, IGNORE],
            &[0, -1, 1, 1],
        );
        let roles = [U, A];
        let right = labeled(&[10, 11, 12, 13], &[IGNORE, 11, 12, 13]);
        assert_eq!(judge_row(&right, &s, &roles, Mode::Last), 0);
        let untrained = labeled(&[10, 11, 12, 13], &[IGNORE, IGNORE, IGNORE, 13]);
        assert_eq!(
            judge_row(&untrained, &s, &roles, Mode::Last),
            UNTRAINED_TARGET_FIELD
        );
        let user = labeled(&[10, 11, 12, 13], &[10, IGNORE, 12, 13]);
        assert_eq!(judge_row(&user, &s, &roles, Mode::Last), TRAINS_NON_TARGET);
        let other = labeled(&[10, 11, 12, 13], &[IGNORE, IGNORE, 99, 13]);
        assert_eq!(judge_row(&other, &s, &roles, Mode::All), LABEL_NOT_TOKEN);
        let long = labeled(&[10, 11, 12, 13], &[IGNORE, IGNORE, 12, 13, IGNORE]);
        assert_eq!(judge_row(&long, &s, &roles, Mode::All), LENGTH);
        let short = labeled(&[10, 11, 12, 13], &[IGNORE, IGNORE]);
        assert_eq!(
            judge_row(&short, &s, &roles, Mode::All),
            LENGTH | UNTRAINED_TARGET_FIELD
        );
        let cut = labeled(&[10, 11, 12], &[IGNORE, IGNORE, 12]);
        assert_eq!(judge_row(&cut, &s, &roles, Mode::All), UNMEASURED);
    }

    #[test]
    fn last_and_multistep_target_only_the_last_assistant_turn() {
        let s = spans(&[1, 2, 3], &[1, IGNORE, 3], &[0, 1, 2]);
        let roles = [A, U, A];
        let both = labeled(&[1, 2, 3], &[1, IGNORE, 3]);
        assert_eq!(judge_row(&both, &s, &roles, Mode::All), 0);
        assert_eq!(
            judge_row(&both, &s, &roles, Mode::Multistep),
            TRAINS_NON_TARGET
        );
        let last = labeled(&[1, 2, 3], &[IGNORE, IGNORE, 3]);
        assert_eq!(judge_row(&last, &s, &roles, Mode::Last), 0);
        assert_eq!(
            judge_row(&last, &s, &roles, Mode::All),
            UNTRAINED_TARGET_FIELD
        );
    }
}
