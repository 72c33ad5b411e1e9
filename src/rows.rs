//! JSONL rows parsed in the core: the bytes of a line straight to template values with serde_json,
//! so `chatmask tokenize` builds no Python objects for a row on the hot path.
//!
//! The rules are `chatmask.rows`' for JSON text (rule 1: nulls are real and kept; a `tools`
//! string is parsed as JSON). The core only takes the rows it can read exactly as Python's
//! `json.loads` would; every other line (invalid JSON, an error the Python parser words, an
//! integer too large for serde_json, a `-0`, nesting deeper than serde_json's limit) is left to
//! `chatmask.rows`, which reads it and gives its reason. So the two paths agree on every row,
//! and `tests/test_core_rows.py` checks that element by element.

use minijinja::value::{Value, ValueKind};
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};

use crate::chat::UNMASKED_ROLES;
use crate::template::pyfmt::map_pairs;

/// The columns a row is read from (`chatmask.rows.Fields`).
#[derive(Debug, Clone)]
pub struct RowFields {
    pub messages: String,
    pub tools: String,
    pub finish_reason: Option<String>,
    /// A policy's `field_system`; set only for policy rows.
    pub system: Option<String>,
    /// Policy rows: a line holding a JSON array is the messages themselves.
    pub policy: bool,
}

/// One row read by the core.
#[derive(Debug, Clone)]
pub struct JsonRow {
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    pub system: Option<Value>,
    pub finish_reason: Option<String>,
    pub id: Option<String>,
}

impl JsonRow {
    /// Per message: whether its role is one the reference trains (`chatmask.truth`).
    pub fn assistant_messages(&self) -> Vec<bool> {
        self.messages
            .iter()
            .map(|m| {
                m.kind() == ValueKind::Map
                    && map_pairs(m).iter().any(|(k, v)| {
                        k.as_str() == Some("role")
                            && v.as_str().is_some_and(|r| UNMASKED_ROLES.contains(&r))
                    })
            })
            .collect()
    }
}

/// A line's row, or None when `chatmask.rows` must read it (see the module docs).
pub fn parse_line(line: &[u8], fields: &RowFields) -> Option<JsonRow> {
    if needs_python_numbers(line) {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(line);
    let value = de.deserialize_any(ValueVisitor).ok()?;
    de.end().ok()?;
    if fields.policy && value.kind() == ValueKind::Seq {
        if !value.try_iter().ok()?.all(|m| m.kind() == ValueKind::Map) {
            return None;
        }
        let messages = value.try_iter().ok()?.collect();
        return Some(JsonRow {
            messages,
            tools: None,
            system: None,
            finish_reason: None,
            id: None,
        });
    }
    if value.kind() != ValueKind::Map {
        return None;
    }
    let pairs = map_pairs(&value);
    // A message that is not a dict: Python words the error (the policy's or the core's).
    let all_maps = |v: &Value| {
        v.try_iter()
            .is_ok_and(|mut it| it.all(|m| m.kind() == ValueKind::Map))
    };
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v.clone())
    };
    let present = |v: Option<Value>| v.filter(|v| !v.is_none());
    let messages = get(&fields.messages)?;
    if messages.kind() != ValueKind::Seq || !all_maps(&messages) {
        return None;
    }
    let mut tools = present(get(&fields.tools));
    if let Some(text) = tools.as_ref().and_then(|t| t.as_str()) {
        tools = Some(parse_json_text(text.as_bytes())?);
    }
    if tools.as_ref().is_some_and(|t| t.kind() != ValueKind::Seq) {
        return None;
    }
    let finish_reason = match fields.finish_reason.as_deref().map(get) {
        Some(Some(v)) if !v.is_none() => Some(v.as_str()?.to_string()),
        _ => None,
    };
    let system = fields.system.as_deref().and_then(|f| present(get(f)));
    Some(JsonRow {
        messages: messages.try_iter().ok()?.collect(),
        tools,
        system,
        finish_reason,
        id: row_id(present(get("id")))?,
    })
}

/// `json.loads` of a tools string: the same exactness rules as a line.
fn parse_json_text(text: &[u8]) -> Option<Value> {
    if needs_python_numbers(text) {
        return None;
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = de.deserialize_any(ValueVisitor).ok()?;
    de.end().ok()?;
    Some(value)
}

/// The row's id as `chatmask.rows` gives it: a string as it is, an integer as `json.dumps`
/// prints it; any other kind is left to Python (outer None).
fn row_id(raw: Option<Value>) -> Option<Option<String>> {
    match raw {
        None => Some(None),
        Some(v) if v.as_str().is_some() => Some(v.as_str().map(str::to_string)),
        Some(v) if v.kind() == ValueKind::Number && v.is_integer() => Some(Some(v.to_string())),
        Some(_) => None,
    }
}

/// Numbers serde_json reads differently from Python: integers of 19 or more digits (serde_json
/// turns those beyond u64 into floats, Python keeps them exact) and `-0` (serde_json: the float
/// -0.0; Python: the int 0). Matches inside strings only send a line to the Python path.
fn needs_python_numbers(bytes: &[u8]) -> bool {
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_digit() {
            run += 1;
            if run >= 19 {
                return true;
            }
            if b == b'0' && run == 1 && i > 0 && bytes[i - 1] == b'-' {
                let next = bytes.get(i + 1).copied().unwrap_or(b' ');
                if !matches!(next, b'.' | b'e' | b'E') && !next.is_ascii_digit() {
                    return true;
                }
            }
        } else {
            run = 0;
        }
    }
    false
}

/// JSON to template values as `json.loads` then transformers' plain data would make them:
/// objects keep their key order (a repeated key keeps its first place and its last value, as a
/// Python dict does), integers stay integers.
struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::from(()))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        // The Python path holds integers as i64, and as i128 beyond it.
        Ok(i64::try_from(v).map_or_else(|_| Value::from(v as i128), Value::from))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(Seed)? {
            items.push(item);
        }
        Ok(Value::from(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut pairs: Vec<(Value, Value)> = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(Seed)?;
            match pairs
                .iter_mut()
                .find(|(k, _)| k.as_str() == Some(key.as_str()))
            {
                Some(slot) => slot.1 = value,
                None => pairs.push((Value::from(key), value)),
            }
        }
        Ok(Value::from_pairs(pairs))
    }
}

struct Seed;

impl<'de> serde::de::DeserializeSeed<'de> for Seed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor)
    }
}

/// A policy's dataset shaping (`MaskPolicy.shape`) for rows the core read. Policies with
/// `split_thinking` are shaped in Python (the caller does not build a `Shape` for them).
#[derive(Debug, Clone, Default)]
pub struct Shape {
    /// Dataset role name -> template role.
    pub role_lookup: Vec<(String, String)>,
    /// `message_property_mappings` (template key, source key); None: ShareGPT is detected.
    pub mappings: Option<Vec<(String, String)>>,
    pub drop_system_message: bool,
}

impl Shape {
    /// `MaskPolicy.shape`: the messages with mapped keys and roles, the system field inserted
    /// when no system message leads, a leading system message dropped when asked. None: a
    /// message is not a dict (Python words that error).
    pub fn apply(&self, row: &JsonRow) -> Option<Vec<Value>> {
        let mut messages = row
            .messages
            .iter()
            .map(|m| self.message(m))
            .collect::<Option<Vec<_>>>()?;
        let leads_with_system = |ms: &[Value]| {
            ms.first()
                .and_then(|m| m.get_attr("role").ok())
                .is_some_and(|r| r.as_str() == Some("system"))
        };
        if let Some(system) = row.system.as_ref().filter(|s| s.is_true()) {
            if !leads_with_system(&messages) {
                let pairs = [("role", Value::from("system")), ("content", system.clone())];
                messages.insert(0, Value::from_pairs(pairs));
            }
        }
        if self.drop_system_message && leads_with_system(&messages) {
            messages.remove(0);
        }
        Some(messages)
    }

    fn message(&self, message: &Value) -> Option<Value> {
        if message.kind() != ValueKind::Map {
            return None;
        }
        let pairs = map_pairs(message);
        let has = |key: &str| pairs.iter().any(|(k, _)| k.as_str() == Some(key));
        let sharegpt = [("role", "from"), ("content", "value")].map(|(a, b)| (a.into(), b.into()));
        let mappings: Option<&[(String, String)]> = match &self.mappings {
            Some(m) => Some(m),
            None if !has("role") && has("from") => Some(&sharegpt),
            None => None,
        };
        let mut out: Vec<(Value, Value)> = match mappings.filter(|m| !m.is_empty()) {
            None => pairs.clone(),
            Some(mappings) => {
                let is_source = |k: &Value| mappings.iter().any(|(_, s)| k.as_str() == Some(s));
                let mut out: Vec<_> = pairs
                    .iter()
                    .filter(|(k, _)| !is_source(k))
                    .cloned()
                    .collect();
                for (key, source) in mappings {
                    let found = pairs.iter().find(|(k, _)| k.as_str() == Some(source));
                    if let Some((_, v)) = found.filter(|(_, v)| !v.is_none()) {
                        match out.iter_mut().find(|(k, _)| k.as_str() == Some(key)) {
                            Some(slot) => slot.1 = v.clone(),
                            None => out.push((Value::from(key.as_str()), v.clone())),
                        }
                    }
                }
                out
            }
        };
        if let Some(slot) = out.iter_mut().find(|(k, _)| k.as_str() == Some("role")) {
            if let Some(role) = slot.1.as_str() {
                if let Some((_, to)) = self.role_lookup.iter().find(|(from, _)| from == role) {
                    slot.1 = Value::from(to.as_str());
                }
            }
        }
        Some(Value::from_pairs(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> RowFields {
        RowFields {
            messages: "messages".into(),
            tools: "tools".into(),
            finish_reason: None,
            system: None,
            policy: false,
        }
    }

    #[test]
    fn numbers_python_reads_otherwise_go_to_python() {
        for line in [
            r#"{"messages": [], "n": 12345678901234567890123}"#,
            r#"{"messages": [], "n": -0}"#,
            r#"{"messages": [], "n": [-0]}"#,
        ] {
            assert!(parse_line(line.as_bytes(), &fields()).is_none(), "{line}");
        }
        for line in [
            r#"{"messages": [], "n": -0.0}"#,
            r#"{"messages": [], "n": -0e1}"#,
            r#"{"messages": [], "n": 100, "m": -10}"#,
        ] {
            assert!(parse_line(line.as_bytes(), &fields()).is_some(), "{line}");
        }
    }

    #[test]
    fn repeated_keys_keep_first_place_last_value() {
        let row = parse_line(
            br#"{"messages": [{"role": "user", "content": "a", "role": "assistant"}]}"#,
            &fields(),
        )
        .unwrap();
        let pairs = map_pairs(&row.messages[0]);
        let keys: Vec<_> = pairs.iter().map(|(k, _)| k.to_string()).collect();
        assert_eq!(keys, ["role", "content"]);
        assert_eq!(pairs[0].1.as_str(), Some("assistant"));
    }

    #[test]
    fn rows_python_words_go_to_python() {
        for line in [
            "",
            "  ",
            "[1]",
            "{\"messages\": {}}",
            "{\"id\": 1}",
            "{\"messages\": [], \"tools\": \"{bad\"}",
            "{\"messages\": [], \"tools\": {}}",
            "{\"messages\": [], \"id\": 1.5}",
            "{\"messages\": [\"a\u{1}b\"]}",
            "{\"messages\": []} x",
        ] {
            assert!(parse_line(line.as_bytes(), &fields()).is_none(), "{line:?}");
        }
        let row = parse_line(br#"{"messages": [], "id": 7, "tools": "[1]"}"#, &fields()).unwrap();
        assert_eq!(row.id.as_deref(), Some("7"));
        assert_eq!(row.tools.unwrap().len(), Some(1));
    }
}
