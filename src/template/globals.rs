//! The filters, tests and globals transformers' Jinja2 environment has and minijinja's builtins
//! lack or spell differently; `build_environment` registers them.

use std::sync::Arc;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error as JinjaError, ErrorKind, State};

use super::pyfmt::{self, JsonStyle};
use super::{methods, pyvalues, TemplateRaised};

/// The identity, except that None is not iterable (Jinja2's TypeError).
pub(super) fn iterable_or_raise(value: Value) -> Result<Value, JinjaError> {
    if value.is_none() {
        return Err(pyfmt::type_error(
            "'NoneType' object is not iterable".into(),
        ));
    }
    Ok(value)
}

/// Python's `str.splitlines()` (without keepends).
fn py_splitlines(s: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let is_break = matches!(
            c,
            '\n' | '\r'
                | '\u{b}'
                | '\u{c}'
                | '\u{1c}'
                | '\u{1d}'
                | '\u{1e}'
                | '\u{85}'
                | '\u{2028}'
                | '\u{2029}'
        );
        if is_break {
            lines.push(&s[start..i]);
            let mut next = i + c.len_utf8();
            if c == '\r' {
                if let Some(&(j, '\n')) = chars.peek() {
                    chars.next();
                    next = j + 1;
                }
            }
            start = next;
        }
    }
    if start < s.len() {
        lines.push(&s[start..]);
    }
    lines
}

/// Jinja2's `indent(width=4, first=False, blank=False)`, trailing-newline quirk included.
pub(super) fn indent(
    value: &Value,
    width: Option<Value>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<String, JinjaError> {
    let width = match width {
        Some(w) => Some(w),
        None => kwargs.get::<Option<Value>>("width")?,
    };
    let first = first.or(kwargs.get::<Option<bool>>("first")?);
    let blank = blank.or(kwargs.get::<Option<bool>>("blank")?);
    kwargs.assert_all_used()?;
    let indention = match &width {
        Some(w) if w.as_str().is_some() => w.as_str().unwrap_or_default().to_string(),
        Some(w) => " ".repeat(w.as_i64().unwrap_or(4).max(0) as usize),
        None => "    ".to_string(),
    };
    let s = format!("{}\n", pyfmt::py_str(value));
    let lines = py_splitlines(&s);
    let mut rv = if blank.unwrap_or(false) {
        lines.join(&format!("\n{indention}"))
    } else {
        let mut iter = lines.into_iter();
        let mut rv = iter.next().unwrap_or_default().to_string();
        let rest: Vec<String> = iter
            .map(|l| {
                if l.is_empty() {
                    String::new()
                } else {
                    format!("{indention}{l}")
                }
            })
            .collect();
        if !rest.is_empty() {
            rv.push('\n');
            rv.push_str(&rest.join("\n"));
        }
        rv
    };
    if first.unwrap_or(false) {
        rv = format!("{indention}{rv}");
    }
    Ok(rv)
}

/// Jinja2's `map`, `select`, `reject`, `selectattr` and `rejectattr` return generators: always
/// true, without a length, and refused by `tojson`. minijinja's return lists; wrap them lazily.
pub(super) fn generator(items: Vec<Value>) -> Value {
    let items = Arc::new(items);
    Value::make_iterable(move || {
        let items = items.clone();
        (0..items.len()).map(move |i| items[i].clone())
    })
}

/// Jinja2's `sequence` test: anything with a length and item access (strings and dicts too).
pub(super) fn is_sequence(value: &Value) -> bool {
    value.is_undefined()
        || matches!(
            value.kind(),
            ValueKind::Seq | ValueKind::Map | ValueKind::String | ValueKind::Bytes
        )
}

pub(super) fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be int or str",
                ))
            }
        },
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let separators = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => Some((pyfmt::py_str(a), pyfmt::py_str(b))),
                _ => {
                    return Err(JinjaError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair",
                    ))
                }
            }
        }
        _ => None,
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let style = JsonStyle::new(
        indent,
        separators,
        sort_keys.unwrap_or(false),
        ensure_ascii.unwrap_or(false),
    );
    pyfmt::json_dumps(value, &style).map(Value::from)
}

/// Jinja2's `|string` is `soft_str`: Markup stays Markup.
pub(super) fn python_string(value: Value) -> Value {
    if value.is_safe() {
        return value;
    }
    Value::from(pyfmt::py_str(&value))
}

/// Jinja2's `|trim`; on Markup, `Markup.strip`, which escapes its argument and stays Markup.
pub(super) fn trim(value: &Value, chars: Option<String>) -> Value {
    let s = pyfmt::py_str(value);
    if value.is_safe() {
        let chars = chars.as_deref().map(pyvalues::html_escape);
        return Value::from_safe_string(
            methods::py_strip(&s, chars.as_deref(), true, true).to_string(),
        );
    }
    Value::from(methods::py_strip(&s, chars.as_deref(), true, true))
}

pub(super) fn join(
    state: &State,
    value: &Value,
    sep: Option<String>,
    attribute: Option<String>,
) -> Result<String, JinjaError> {
    let _ = state;
    let sep = sep.unwrap_or_default();
    let mut parts = Vec::new();
    for item in value.try_iter()? {
        let item = match &attribute {
            Some(attr) => item.get_attr(attr)?,
            None => item,
        };
        parts.push(pyfmt::py_str(&item));
    }
    Ok(parts.join(&sep))
}

/// Jinja2's `iterable` test: None is not iterable there (minijinja iterates it as empty).
pub(super) fn is_iterable(value: &Value) -> bool {
    !value.is_none() && (value.is_undefined() || value.try_iter().is_ok())
}

pub(super) fn raise_exception(message: Value) -> Result<Value, JinjaError> {
    let text = pyfmt::py_str(&message);
    Err(JinjaError::new(ErrorKind::InvalidOperation, text.clone())
        .with_source(TemplateRaised(text)))
}

pub(super) fn strftime_now(format: String) -> Result<String, JinjaError> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format {format:?}"),
        )
    })?;
    Ok(out)
}

/// The context variable holding the two marker characters while spans are tracked.
pub const MARKERS_VAR: &str = "__chatmask_generation_markers";

/// `{% generation %}` blocks render their body, wrapped in the span markers when tracking.
pub(super) fn generation_block(state: &State, value: Value) -> Value {
    let markers = state.lookup(MARKERS_VAR);
    let mut chars = markers
        .as_ref()
        .and_then(|m| m.as_str())
        .map(|m| m.chars())
        .into_iter()
        .flatten();
    match (chars.next(), chars.next()) {
        (Some(start), Some(end)) => Value::from(format!("{start}{}{end}", pyfmt::py_str(&value))),
        _ => value,
    }
}
