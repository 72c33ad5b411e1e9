//! Span-based labels: which tokens a [`Policy`] trains, from the character spans of each
//! message's fields in one render (see `spans`), and length limits.
//!
//! Everything is decided on characters first and mapped to tokens last: a token is trained
//! when any of its characters lies in a trained range (as transformers' generation masks do),
//! and a trained token that also covers characters outside every trained range is counted as
//! straddling.

use minijinja::value::{Value, ValueKind};

use crate::error::{Error, Result};
use crate::template::pyfmt::map_pairs;

/// `train_on_eot` / `train_on_eos`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndTokens {
    None,
    /// The end token of every trained message.
    Turn,
    /// The end token of every message.
    All,
    /// Only the last end token of the sequence.
    Last,
}

impl EndTokens {
    pub fn name(self) -> &'static str {
        match self {
            EndTokens::None => "none",
            EndTokens::Turn => "turn",
            EndTokens::All => "all",
            EndTokens::Last => "last",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(EndTokens::None),
            "turn" => Ok(EndTokens::Turn),
            "all" => Ok(EndTokens::All),
            "last" => Ok(EndTokens::Last),
            other => Err(Error::InvalidInput(format!(
                "train_on_eot/eos must be 'none', 'turn', 'all' or 'last', not {other:?}"
            ))),
        }
    }
}

/// What to do with a row longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Error,
    Drop,
    /// Keep the last trained message whole and cut context from the left.
    TruncateLeft,
    TruncateRight,
}

impl Overflow {
    pub fn name(self) -> &'static str {
        match self {
            Overflow::Error => "error",
            Overflow::Drop => "drop",
            Overflow::TruncateLeft => "truncate_left",
            Overflow::TruncateRight => "truncate_right",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "error" => Ok(Overflow::Error),
            "drop" => Ok(Overflow::Drop),
            "truncate_left" => Ok(Overflow::TruncateLeft),
            "truncate_right" => Ok(Overflow::TruncateRight),
            other => Err(Error::InvalidInput(format!(
                "overflow must be 'error', 'drop', 'truncate_left' or 'truncate_right', not {other:?}"
            ))),
        }
    }
}

/// Where the trained characters come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanSource {
    /// Each message's fields, by role and per-message overrides.
    Messages,
    /// The template's `{% generation %}` blocks.
    Generation,
}

impl SpanSource {
    pub fn name(self) -> &'static str {
        match self {
            SpanSource::Messages => "messages",
            SpanSource::Generation => "generation",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "messages" => Ok(SpanSource::Messages),
            "generation" => Ok(SpanSource::Generation),
            other => Err(Error::InvalidInput(format!(
                "source must be 'messages' or 'generation', not {other:?}"
            ))),
        }
    }
}

/// A labelling policy (the Python `MaskPolicy`, minus dataset shaping, which happens before).
#[derive(Debug, Clone)]
pub struct Policy {
    pub roles_to_train: Vec<String>,
    pub train_on_inputs: bool,
    pub train_on_eot: EndTokens,
    pub train_on_eos: EndTokens,
    /// End-of-turn token ids; `None`: the first special added token after a message.
    pub eot_tokens: Option<Vec<u32>>,
    pub train_reasoning: bool,
    /// Give a message the template text between the generation prompt and its first field
    /// (a `<tool_call>` opener, Qwen3's `<think>`): the model writes it too.
    pub train_turn_prefix: bool,
    pub field_training: String,
    pub field_training_detail: String,
    pub max_length: Option<usize>,
    pub overflow: Overflow,
    pub source: SpanSource,
    /// Encode control-token text in the inputs as text, as transformers 5's
    /// `apply_chat_template(..., sanitize_control_tokens=True)` does.
    pub sanitize_control_tokens: bool,
}

/// Rust tests' starting point only. The defaults users get are `MaskPolicy()`'s, which Python
/// always passes in full; test_policy checks the core reads them unchanged.
#[cfg(test)]
impl Default for Policy {
    fn default() -> Self {
        Policy {
            roles_to_train: vec!["assistant".into()],
            train_on_inputs: false,
            train_on_eot: EndTokens::Turn,
            train_on_eos: EndTokens::Turn,
            eot_tokens: None,
            train_reasoning: true,
            train_turn_prefix: true,
            field_training: "training".into(),
            field_training_detail: "training_detail".into(),
            max_length: None,
            overflow: Overflow::Error,
            source: SpanSource::Messages,
            sanitize_control_tokens: false,
        }
    }
}

/// How a row's spans were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanMethod {
    /// One render with every field marked, checked equal to the plain render.
    OneRender,
    /// One render per field, each checked.
    PerField,
    /// At least one field located by diffing against a render with it replaced.
    Diff,
}

impl SpanMethod {
    pub fn name(self) -> &'static str {
        match self {
            SpanMethod::OneRender => "one_render",
            SpanMethod::PerField => "per_field",
            SpanMethod::Diff => "diff",
        }
    }
}

/// What the policy reads from one message.
#[derive(Debug, Clone, Default)]
pub struct MessageInfo {
    pub role: Option<String>,
    pub training: Option<bool>,
    /// `(begin, end inclusive, train)` character ranges of the content.
    pub detail: Option<Vec<(usize, usize, bool)>>,
}

fn get<'a>(pairs: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    pairs
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

impl MessageInfo {
    pub fn read(message: &Value, index: usize, policy: &Policy) -> Result<MessageInfo> {
        let pairs = map_pairs(message);
        let role = get(&pairs, "role")
            .and_then(|r| r.as_str())
            .map(str::to_string);
        let training = match get(&pairs, &policy.field_training) {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) if v.kind() == ValueKind::Bool => Some(v.is_true()),
            Some(v) => {
                return Err(Error::InvalidInput(format!(
                    "message {index}: '{}' must be true or false, not {v}",
                    policy.field_training
                )))
            }
        };
        let detail = match get(&pairs, &policy.field_training_detail) {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) => Some(read_detail(v, index, &policy.field_training_detail)?),
        };
        Ok(MessageInfo {
            role,
            training,
            detail,
        })
    }

    fn trained(&self, policy: &Policy) -> bool {
        match (self.training, &self.detail) {
            (Some(t), _) => t,
            (None, Some(d)) => !d.is_empty(),
            (None, None) => {
                policy.train_on_inputs
                    || self
                        .role
                        .as_deref()
                        .is_some_and(|r| policy.roles_to_train.iter().any(|x| x == r))
            }
        }
    }
}

fn read_detail(v: &Value, index: usize, field: &str) -> Result<Vec<(usize, usize, bool)>> {
    let bad = |why: &str| Error::InvalidInput(format!("message {index}: '{field}' {why}"));
    let items = v
        .try_iter()
        .map_err(|_| bad("must be a list of {begin_offset, end_offset, train}"))?;
    let mut out = Vec::new();
    for item in items {
        let pairs = map_pairs(&item);
        let num = |key: &str| -> Result<usize> {
            get(&pairs, key)
                .and_then(|x| i64::try_from(x.clone()).ok())
                .and_then(|x| usize::try_from(x).ok())
                .ok_or_else(|| bad(&format!("entries need a non-negative integer '{key}'")))
        };
        let (begin, end) = (num("begin_offset")?, num("end_offset")?);
        if end < begin {
            return Err(bad(&format!(
                "has end_offset {end} before begin_offset {begin}"
            )));
        }
        let train = get(&pairs, "train").is_some_and(|t| t.is_true());
        out.push((begin, end, train));
    }
    Ok(out)
}

mod fit;
mod label;
mod ranges;

pub use fit::{fit_length, Tokenized};
pub use label::{label, Labels, SpanRow};
