//! A tokenized row and `max_length`: truncation or dropping, as the policy's `overflow` says.

use super::{Overflow, Policy};
use crate::error::{Error, Result};
use crate::label::IGNORE;

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
