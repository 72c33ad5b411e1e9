//! Conversations as the template sees them, prepared the way transformers 5 prepares them.

use minijinja::value::{Value, ValueKind};

use crate::error::{Error, Result};
use crate::template::pyfmt::{map_pairs, py_type_name};

/// The reference trains on these roles (atropos' `UNMASKED_ROLES`).
pub const UNMASKED_ROLES: [&str; 2] = ["assistant", "agent"];

/// Names a message's reasoning may come under; the first is what templates read.
const REASONING_FIELDS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// What the reference sees in `chat[i]["role"]`, read before None-valued keys are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Missing,
    Unmasked,
    Other,
}

/// A conversation ready to render: messages preprocessed, roles as the reference reads them.
#[derive(Debug, Clone)]
pub struct Conversation {
    pub messages: Vec<Value>,
    pub roles: Vec<Role>,
}

impl Conversation {
    /// Prepares raw messages (plain template data: maps, lists, scalars).
    pub fn new(raw: Vec<Value>) -> Result<Conversation> {
        let mut messages = Vec::with_capacity(raw.len());
        let mut roles = Vec::with_capacity(raw.len());
        for (i, msg) in raw.iter().enumerate() {
            if msg.kind() != ValueKind::Map {
                return Err(Error::InvalidInput(format!(
                    "message {i} is a {}, not a dict",
                    py_type_name(msg)
                )));
            }
            let pairs = map_pairs(msg);
            let role = match pairs.iter().find(|(k, _)| k.as_str() == Some("role")) {
                None => Role::Missing,
                Some((_, v)) => match v.as_str() {
                    Some(r) if UNMASKED_ROLES.contains(&r) => Role::Unmasked,
                    _ => Role::Other,
                },
            };
            roles.push(role);
            messages.push(prepare_message(pairs));
        }
        Ok(Conversation { messages, roles })
    }

    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// `chat[:n]` as a conversation of its own.
    pub fn head(&self, n: usize) -> Conversation {
        Conversation {
            messages: self.messages[..n].to_vec(),
            roles: self.roles[..n].to_vec(),
        }
    }

    /// `chat[:n]` as a template value.
    pub fn prefix(&self, n: usize) -> Value {
        Value::from(self.messages[..n].to_vec())
    }
}

/// transformers 5: drop None-valued keys, then alias reasoning into `thinking` and
/// `reasoning_content` as `{"thinking": r, **message, "reasoning_content": r}`.
fn prepare_message(pairs: Vec<(Value, Value)>) -> Value {
    let pairs: Vec<(Value, Value)> = pairs.into_iter().filter(|(_, v)| !v.is_none()).collect();
    let reasoning = REASONING_FIELDS.iter().find_map(|field| {
        pairs
            .iter()
            .find(|(k, _)| k.as_str() == Some(*field))
            .map(|(_, v)| v.clone())
    });
    let Some(reasoning) = reasoning else {
        return Value::from_pairs(pairs);
    };
    let mut out: Vec<(Value, Value)> = Vec::with_capacity(pairs.len() + 2);
    out.push((Value::from("thinking"), reasoning.clone()));
    for (k, v) in pairs {
        match out.iter_mut().find(|(existing, _)| *existing == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    match out
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some("reasoning_content"))
    {
        Some(slot) => slot.1 = reasoning,
        None => out.push((Value::from("reasoning_content"), reasoning)),
    }
    Value::from_pairs(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &Value) -> Vec<String> {
        map_pairs(v)
            .into_iter()
            .map(|(k, _)| k.to_string())
            .collect()
    }

    #[test]
    fn none_keys_dropped_and_reasoning_aliased_in_python_order() {
        let raw = Value::from_pairs(vec![
            ("role", Value::from("assistant")),
            ("content", Value::from(())),
            ("reasoning", Value::from("why")),
        ]);
        let conv = Conversation::new(vec![raw]).unwrap();
        assert_eq!(
            keys(&conv.messages[0]),
            ["thinking", "role", "reasoning", "reasoning_content"]
        );
        assert_eq!(conv.roles, [Role::Unmasked]);
    }

    #[test]
    fn role_read_before_none_dropping() {
        let missing = Value::from_pairs(vec![("content", Value::from("x"))]);
        let none_role = Value::from_pairs(vec![
            ("role", Value::from(())),
            ("content", Value::from("x")),
        ]);
        let conv = Conversation::new(vec![missing, none_role]).unwrap();
        assert_eq!(conv.roles, [Role::Missing, Role::Other]);
        assert!(Conversation::new(vec![Value::from("hi")]).is_err());
    }
}
