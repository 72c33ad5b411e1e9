//! atropos' `tokenize_for_trainer` modes, reproduced exactly, quirks included.
//!
//! The reference renders and encodes every prefix it needs. Here the full chat is encoded once
//! and every prefix's tokens come from [`Encoder::prefix_tokens`], which re-encodes only the
//! part that differs. The label arithmetic is the reference's, including numpy's slice
//! assignment rules in all-turns mode.

use crate::chat::Role;
use crate::encode::{Encoded, Encoder, PrefixTokens};
use crate::error::{Error, Result};

pub const IGNORE: i64 = -100;

/// Which of the reference's functions to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `tokenize_for_trainer(..., train_on_all_assistant_turns=False)`
    Last,
    /// `tokenize_for_trainer(..., train_on_all_assistant_turns=True)`
    All,
    /// `tokenize_for_trainer_multistep`
    Multistep,
    /// Labels from the template's `{% generation %}` blocks: exact where prefix renders are
    /// not prefixes of the full render (where the count-based modes are wrong).
    Generation,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "last" => Ok(Mode::Last),
            "all" => Ok(Mode::All),
            "multistep" => Ok(Mode::Multistep),
            "generation" => Ok(Mode::Generation),
            other => Err(Error::InvalidInput(format!(
                "mode must be 'last', 'all', 'multistep' or 'generation', not {other:?}"
            ))),
        }
    }
}

/// The reference's output: `tokens`, and `masks` (labels), which may be longer than `tokens`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Labeled {
    pub tokens: Vec<u32>,
    pub masks: Vec<i64>,
}

/// Renders `chat[:n]`, with or without the generation prompt.
pub type RenderFn<'a> = dyn Fn(usize, bool) -> Result<String> + 'a;

/// Labels one conversation with the reference's arithmetic.
///
/// `roles` holds what the reference reads as `chat[i]["role"]`; `eos` is the tokenizer's
/// `eos_token_id`, which `finish_reason == "length"` strips from the end.
pub fn label(
    encoder: &Encoder,
    render: &RenderFn<'_>,
    roles: &[Role],
    mode: Mode,
    finish_length: bool,
    eos: Option<u32>,
) -> Result<Labeled> {
    let n = roles.len();
    if n == 0 {
        return Err(Error::EmptyConversation);
    }
    let full = encoder.encode_full(render(n, false)?)?;
    label_encoded(encoder, full, render, roles, mode, finish_length, eos)
}

/// [`label`] with the whole conversation's render already encoded (`full`: `render(n, false)`,
/// never rendered again), so a caller that also needs those tokens (the run-time judge,
/// `crate::truth`) encodes it once.
pub fn label_encoded(
    encoder: &Encoder,
    full: Encoded,
    render: &RenderFn<'_>,
    roles: &[Role],
    mode: Mode,
    finish_length: bool,
    eos: Option<u32>,
) -> Result<Labeled> {
    let n = roles.len();
    let prefix = |m: usize, add_generation_prompt: bool| {
        if m == 0 {
            return Err(Error::EmptyConversation);
        }
        // `full` is the render of `chat[:n]` without the generation prompt, and a render is a
        // function of its inputs (`strftime_now` aside, which could only differ across a
        // change of date between two back-to-back renders): the reference's second render of
        // it (the end of a last assistant turn in `all` and `multistep`) is not repeated.
        if m == n && !add_generation_prompt {
            return Ok(PrefixTokens::whole(&full));
        }
        encoder.prefix_tokens(&full, &render(m, add_generation_prompt)?)
    };
    let total = full.ids.len();
    let mut masks: Vec<i64>;
    match mode {
        Mode::Last => {
            let boundary = prefix(n - 1, true)?.len();
            masks = vec![IGNORE; boundary];
            masks.extend(full.ids.iter().skip(boundary).map(|&t| t as i64));
        }
        Mode::All => {
            masks = vec![IGNORE; total];
            for (i, role) in roles.iter().enumerate() {
                match role {
                    Role::Missing => return Err(Error::MissingRole { message: i }),
                    Role::Other => continue,
                    Role::Unmasked => {}
                }
                let start = prefix(i, true)?.len();
                let turn = prefix(i + 1, false)?;
                let end = turn.len();
                // numpy: masks[start:end] = array(turn_tokens[start:])
                let rhs_len = end.saturating_sub(start);
                let (lo, hi) = (start.min(total), end.min(total));
                let lhs_len = if start <= end { hi - lo } else { 0 };
                if rhs_len == lhs_len {
                    for k in 0..lhs_len {
                        masks[lo + k] = turn.get(start + k) as i64;
                    }
                } else if rhs_len == 1 {
                    let value = turn.get(start) as i64;
                    masks[lo..hi].iter_mut().for_each(|m| *m = value);
                } else {
                    return Err(Error::Broadcast {
                        from: rhs_len,
                        into: lhs_len,
                    });
                }
            }
        }
        Mode::Generation => {
            return Err(Error::Internal(
                "generation labels come from label_generation".into(),
            ));
        }
        Mode::Multistep => {
            masks = vec![IGNORE; total];
            let mut target = None;
            for i in (0..n).rev() {
                match roles[i] {
                    Role::Missing => return Err(Error::MissingRole { message: i }),
                    Role::Unmasked => {
                        target = Some(i);
                        break;
                    }
                    Role::Other => {}
                }
            }
            if let Some(i) = target {
                let start = prefix(i, true)?.len();
                let end = prefix(i + 1, false)?.len();
                if start < end && end <= total {
                    for (mask, &id) in masks[start..end].iter_mut().zip(&full.ids[start..end]) {
                        *mask = id as i64;
                    }
                }
            }
        }
    }
    let mut tokens = full.ids;
    if finish_length {
        match tokens.last() {
            None if mode != Mode::Multistep => return Err(Error::EmptyTokens),
            Some(&last) if Some(last) == eos => {
                tokens.pop();
                masks.pop();
            }
            _ => {}
        }
    }
    Ok(Labeled { tokens, masks })
}

/// Labels from an assistant mask: the token where the mask is set, IGNORE elsewhere.
/// `finish_length` drops a trailing eos, as the reference's multistep mode does.
pub fn label_generation(
    mut tokens: Vec<u32>,
    mask: &[u8],
    finish_length: bool,
    eos: Option<u32>,
) -> Labeled {
    let mut masks: Vec<i64> = tokens
        .iter()
        .zip(mask)
        .map(|(&t, &m)| if m != 0 { t as i64 } else { IGNORE })
        .collect();
    if finish_length && tokens.last().is_some_and(|&t| Some(t) == eos) {
        tokens.pop();
        masks.pop();
    }
    Labeled { tokens, masks }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{self, DemoKind};

    fn run(texts: &[(usize, bool, &str)], roles: &[Role], mode: Mode) -> Result<Labeled> {
        let tok = demo::chat_tokenizer(DemoKind::ByteLevel).unwrap();
        let render = |n: usize, g: bool| {
            Ok(texts
                .iter()
                .find(|(m, gen, _)| *m == n && *gen == g)
                .map(|t| t.2.to_string())
                .expect("scripted render"))
        };
        label(&tok.encoder, &render, roles, mode, false, tok.eos_token_id)
    }

    const U: Role = Role::Other;
    const A: Role = Role::Unmasked;

    #[test]
    fn last_mode_masks_can_outgrow_tokens() {
        // The prefix (with generation prompt) renders longer than the whole chat.
        let out = run(
            &[
                (2, false, "<|im_start|>"),
                (1, true, "<|im_start|><|im_end|><|im_end|>"),
            ],
            &[U, A],
            Mode::Last,
        )
        .unwrap();
        assert_eq!(out.tokens.len(), 1);
        assert_eq!(out.masks, vec![IGNORE; 3]);
    }

    #[test]
    fn all_mode_follows_numpy_broadcasting() {
        let full = "<|im_start|><|im_end|>";
        // rhs of length 1 broadcasts over an lhs of length 1 after clipping: fine.
        let ok = run(
            &[
                (2, false, full),
                (1, true, "<|im_start|>"),
                (2, false, full),
            ],
            &[U, A],
            Mode::All,
        )
        .unwrap();
        assert_eq!(ok.masks.len(), 2);
        assert_eq!(ok.masks[0], IGNORE);
        // turn render longer than the chat: rhs 2 tokens into a clipped lhs of 1 -> broadcast error.
        let texts = [
            (3, false, full),
            (1, true, "<|im_start|>"),
            (2, false, "<|im_start|><|im_end|><|im_end|>"),
        ];
        let err = run(&texts, &[U, A, U], Mode::All).unwrap_err();
        assert_eq!(err, Error::Broadcast { from: 2, into: 1 });
    }

    #[test]
    fn the_whole_conversation_is_rendered_once() {
        let tok = demo::chat_tokenizer(DemoKind::ByteLevel).unwrap();
        let calls = std::cell::RefCell::new(Vec::new());
        let render = |n: usize, g: bool| {
            calls.borrow_mut().push((n, g));
            Ok(if n == 2 && !g {
                "<|im_start|>q<|im_end|>a"
            } else {
                "<|im_start|>q<|im_end|>"
            }
            .to_string())
        };
        for mode in [Mode::Last, Mode::All, Mode::Multistep] {
            calls.borrow_mut().clear();
            let out = label(&tok.encoder, &render, &[U, A], mode, false, None).unwrap();
            assert_eq!(
                out.masks.iter().filter(|&&m| m != IGNORE).count(),
                1,
                "{mode:?}"
            );
            let whole = calls.borrow().iter().filter(|&&c| c == (2, false)).count();
            assert_eq!(whole, 1, "{mode:?}: {:?}", calls.borrow());
        }
    }

    #[test]
    fn empty_prefix_and_missing_role_raise_like_the_reference() {
        let full = "<|im_start|>";
        assert_eq!(
            run(&[(1, false, full)], &[A], Mode::All).unwrap_err(),
            Error::EmptyConversation
        );
        assert_eq!(
            run(&[(1, false, full)], &[A], Mode::Last).unwrap_err(),
            Error::EmptyConversation
        );
        assert_eq!(
            run(&[(2, false, full)], &[U, Role::Missing], Mode::Multistep).unwrap_err(),
            Error::MissingRole { message: 1 }
        );
    }
}
