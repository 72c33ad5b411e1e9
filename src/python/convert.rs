//! Python values into core values: template data, conversations, batch rows, shapes, policies.

use minijinja::value::Value;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::batch;
use crate::chat::Conversation;
use crate::core::ChatTokenizer;
use crate::encode::EncoderChoice;
use crate::error::Error;
use crate::policy::{EndTokens, Overflow, Policy, SpanSource};
use crate::rows::Shape;

use super::rows::PyJsonRow;

/// Deeper nesting than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 256;

/// A Python value as plain template data (transformers' `_plain_template_data`).
pub(super) fn to_value(obj: &Bound<'_, PyAny>, depth: usize) -> Result<Value, Error> {
    if depth > MAX_DEPTH {
        return Err(Error::InvalidInput(format!(
            "input nested deeper than {MAX_DEPTH} levels"
        )));
    }
    if obj.is_none() {
        return Ok(Value::from(()));
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::from(b.is_true()));
    }
    if let Ok(i) = obj.cast::<PyInt>() {
        if let Ok(v) = i.extract::<i64>() {
            return Ok(Value::from(v));
        }
        return i
            .extract::<i128>()
            .map(Value::from)
            .map_err(|_| Error::InvalidInput(format!("integer {i} is too large")));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        return Ok(Value::from(f.value()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return s.to_str().map(Value::from).map_err(|_| {
            Error::InvalidInput("string is not valid Unicode (lone surrogate)".into())
        });
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut pairs = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            pairs.push((to_value(&k, depth + 1)?, to_value(&v, depth + 1)?));
        }
        return Ok(Value::from_pairs(pairs));
    }
    if let Ok(l) = obj.cast::<PyList>() {
        return l
            .iter()
            .map(|x| to_value(&x, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::from);
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        // A tuple stays a tuple: Python prints it `('a', 'b')` and `%` takes it as its arguments.
        let items = t
            .iter()
            .map(|x| to_value(&x, depth + 1))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Value::from(minijinja::value::Tuple::from(items)));
    }
    let ty = obj.get_type();
    let type_name = ty
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into());
    // Mappings, numpy scalars and pydantic models, as transformers unwraps them.
    if obj.hasattr("items").unwrap_or(false) && obj.hasattr("keys").unwrap_or(false) {
        let items = obj
            .call_method0("items")
            .map_err(|e| Error::InvalidInput(e.to_string()))?;
        let mut pairs = Vec::new();
        for item in items
            .try_iter()
            .map_err(|e| Error::InvalidInput(e.to_string()))?
        {
            let item = item.map_err(|e| Error::InvalidInput(e.to_string()))?;
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item
                .extract()
                .map_err(|e: PyErr| Error::InvalidInput(e.to_string()))?;
            pairs.push((to_value(&k, depth + 1)?, to_value(&v, depth + 1)?));
        }
        return Ok(Value::from_pairs(pairs));
    }
    let module = ty.module().map(|m| m.to_string()).unwrap_or_default();
    if module == "numpy" && obj.hasattr("item").unwrap_or(false) {
        if let Ok(item) = obj.call_method0("item") {
            return to_value(&item, depth + 1);
        }
    }
    if let Ok(dump) = obj.getattr("model_dump") {
        if dump.is_callable() {
            if let Ok(plain) = dump.call0() {
                return to_value(&plain, depth + 1);
            }
        }
    }
    Ok(Value::from(format!("<{type_name}>")))
}

/// A conversation: a list of message dicts, or any other sequence of them (a tuple, or the
/// numpy object array a pandas or Arrow row of a messages column is), as the reference slices.
pub(super) fn to_conversation(chat: &Bound<'_, PyAny>) -> Result<Conversation, Error> {
    let not_a_conversation = || {
        let name = chat
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        Error::InvalidInput(format!(
            "a conversation must be a list of message dicts, not {name}"
        ))
    };
    let messages: Vec<Bound<'_, PyAny>> = if let Ok(l) = chat.cast::<PyList>() {
        l.iter().collect()
    } else if let Ok(t) = chat.cast::<PyTuple>() {
        t.iter().collect()
    } else if chat.is_instance_of::<PyString>()
        || chat.is_instance_of::<PyDict>()
        || !chat.hasattr("__len__").unwrap_or(false)
    {
        return Err(not_a_conversation());
    } else {
        let items = chat.try_iter().map_err(|_| not_a_conversation())?;
        items
            .collect::<PyResult<_>>()
            .map_err(|_| not_a_conversation())?
    };
    let values = messages
        .iter()
        .map(|m| to_value(m, 1))
        .collect::<Result<Vec<_>, _>>()?;
    Conversation::new(values)
}

/// `MaskPolicy.shape_spec()`: role lookup, property mappings, drop_system_message.
pub(super) fn to_shape(d: &Bound<'_, PyDict>) -> PyResult<Shape> {
    let item = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        d.get_item(key)?
            .ok_or_else(|| PyValueError::new_err(format!("shape has no {key:?}")))
    };
    Ok(Shape {
        role_lookup: item("role_lookup")?.extract()?,
        mappings: item("mappings")?.extract()?,
        drop_system_message: item("drop_system_message")?.extract()?,
    })
}

/// A batch row: a list of messages, or a mapping with "messages" and optionally the row's own
/// "tools" and "documents", or a `JsonRow`.
pub(super) fn to_row(row: &Bound<'_, PyAny>, shape: Option<&Shape>) -> batch::Row {
    if let Ok(json_row) = row.cast::<PyJsonRow>() {
        return json_row.get().to_row(shape);
    }
    let Ok(d) = row.cast::<PyDict>() else {
        return to_conversation(row).map(|conversation| batch::RowInput {
            conversation,
            overrides: Vec::new(),
            finish_length: false,
        });
    };
    let messages = d
        .get_item("messages")
        .ok()
        .flatten()
        .ok_or_else(|| Error::InvalidInput("row has no 'messages'".into()))?;
    let conversation = to_conversation(&messages)?;
    let mut overrides = Vec::new();
    for key in ["tools", "documents"] {
        if let Some(v) = d.get_item(key).ok().flatten() {
            if !v.is_none() {
                overrides.push((key.to_string(), to_value(&v, 1)?));
            }
        }
    }
    Ok(batch::RowInput {
        conversation,
        overrides,
        finish_length: false,
    })
}

pub(super) fn kwargs_to_values(
    kwargs: Option<&Bound<'_, PyDict>>,
) -> Result<Vec<(String, Value)>, Error> {
    let mut out = Vec::new();
    if let Some(d) = kwargs {
        for (k, v) in d.iter() {
            let key: String = k
                .extract()
                .map_err(|_| Error::InvalidInput("keyword names must be str".into()))?;
            out.push((key, to_value(&v, 1)?));
        }
    }
    Ok(out)
}

pub(super) fn ids_list<'py>(py: Python<'py>, ids: &[u32]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, ids)
}

/// A `Policy` from the dict `MaskPolicy.to_core()` builds. `MaskPolicy` declares the keys,
/// their defaults and their checks; this only converts types, so every key must be there (a
/// missing or unknown one is a bug in `to_core()`, never filled in with a default here).
pub(super) fn to_policy<'py>(tok: &ChatTokenizer, d: &Bound<'py, PyDict>) -> PyResult<Policy> {
    let bad = |e: Error| PyValueError::new_err(e.to_string());
    let read = std::cell::RefCell::new(Vec::new());
    let get = |key: &'static str| -> PyResult<Bound<'py, PyAny>> {
        read.borrow_mut().push(key);
        d.get_item(key)?.ok_or_else(|| {
            PyValueError::new_err(format!("internal error: the policy dict has no {key:?} (MaskPolicy.to_core() gives every key)"))
        })
    };
    let end_tokens = |key| EndTokens::parse(&get(key)?.extract::<String>()?).map_err(bad);
    // A struct literal, not `..Default`: a new `Policy` field does not compile until it is read.
    let p = Policy {
        roles_to_train: get("roles_to_train")?.extract()?,
        train_on_inputs: get("train_on_inputs")?.extract()?,
        train_on_eot: end_tokens("train_on_eot")?,
        train_on_eos: end_tokens("train_on_eos")?,
        eot_tokens: match get("eot_tokens")?.extract::<Option<Vec<String>>>()? {
            None => None,
            Some(tokens) => Some(
                tokens
                    .iter()
                    .map(|t| {
                        let ids = tok.encoder.encode(t).map_err(bad)?;
                        match ids.as_slice() {
                            [id] => Ok(*id),
                            _ => Err(PyValueError::new_err(format!(
                                "eot token {t:?} is {} tokens, not one; add it to the tokenizer",
                                ids.len()
                            ))),
                        }
                    })
                    .collect::<PyResult<Vec<u32>>>()?,
            ),
        },
        train_reasoning: get("train_reasoning")?.extract()?,
        train_turn_prefix: get("train_turn_prefix")?.extract()?,
        sanitize_control_tokens: get("sanitize_control_tokens")?.extract()?,
        field_training: get("field_training")?.extract()?,
        field_training_detail: get("field_training_detail")?.extract()?,
        max_length: get("max_length")?.extract()?,
        overflow: Overflow::parse(&get("overflow")?.extract::<String>()?).map_err(bad)?,
        source: SpanSource::parse(&get("source")?.extract::<String>()?).map_err(bad)?,
    };
    let read = read.into_inner();
    for k in d.keys() {
        let key: String = k.extract()?;
        if !read.contains(&key.as_str()) {
            return Err(PyValueError::new_err(format!(
                "unknown policy field {key:?}"
            )));
        }
    }
    Ok(p)
}

pub(super) fn encoder_choice(name: &str) -> PyResult<EncoderChoice> {
    EncoderChoice::parse(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "encoder must be 'auto', 'fast' or 'tokenizers', not {name:?}"
        ))
    })
}
