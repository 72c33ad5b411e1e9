//! atropos' `tokenize_for_trainer` modes, reproduced exactly, quirks included.
//!
//! The reference renders and encodes every prefix it needs. Here the full chat is encoded once
//! and every prefix's tokens come from [`Encoder::prefix_tokens`], which re-encodes only the
//! part that differs. The label arithmetic is the reference's, including numpy's slice
//! assignment rules in all-turns mode.

use crate::chat::Role;
use crate::encode::Encoder;
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
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode> {
        match s {
            "last" => Ok(Mode::Last),
            "all" => Ok(Mode::All),
            "multistep" => Ok(Mode::Multistep),
            other => Err(Error::InvalidInput(format!(
                "mode must be 'last', 'all' or 'multistep', not {other:?}"
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
    let prefix = |m: usize, add_generation_prompt: bool| {
        if m == 0 {
            return Err(Error::EmptyConversation);
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
                    return Err(Error::Broadcast { from: rhs_len, into: lhs_len });
                }
            }
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
                    for k in start..end {
                        masks[k] = full.ids[k] as i64;
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
