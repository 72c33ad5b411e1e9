//! Python's text forms of template values: `json.dumps`, `repr` and `str`.
//!
//! transformers renders with Jinja2, where `{{ x }}`, `x | string` and `x | tojson` go through
//! Python's own formatting. Templates print tool schemas and arguments this way, so the bytes
//! must be Python's, not minijinja's (`None` not `none`, `{'a': 1}` not `{"a": 1}`).

use minijinja::value::{ObjectRepr, Value, ValueKind};
use minijinja::{Error, ErrorKind};
use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// How `json.dumps` was asked to lay out its output.
pub struct JsonStyle {
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
    pub ensure_ascii: bool,
}

impl JsonStyle {
    /// Python's defaults: separators depend on whether an indent is set.
    pub fn new(
        indent: Option<String>,
        separators: Option<(String, String)>,
        sort_keys: bool,
        ensure_ascii: bool,
    ) -> Self {
        let (item_sep, key_sep) = separators.unwrap_or_else(|| {
            let item = if indent.is_some() { "," } else { ", " };
            (item.to_string(), ": ".to_string())
        });
        JsonStyle {
            indent,
            item_sep,
            key_sep,
            sort_keys,
            ensure_ascii,
        }
    }
}

pub(crate) fn type_error(msg: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg)
}

/// Python's `type(x).__name__` for the value kinds a template can hold.
pub fn py_type_name(v: &Value) -> &'static str {
    match v.kind() {
        ValueKind::Undefined => "Undefined",
        ValueKind::None => "NoneType",
        ValueKind::Bool => "bool",
        ValueKind::Number if v.is_integer() => "int",
        ValueKind::Number => "float",
        ValueKind::String => "str",
        ValueKind::Bytes => "bytes",
        ValueKind::Seq => "list",
        ValueKind::Map => "dict",
        _ => "object",
    }
}

/// The shortest digits that round-trip, in `LowerExp` form ("-1.2345e-5"). When two digit
/// strings of that length round-trip, Python (David Gay's dtoa) takes the one nearest the
/// exact binary value, ties to even; Rust's shortest formatting may take the other
/// (`1e15 + 0.3` is 1000000000000000.25: Python prints ...0.2, Rust ...0.3). Formatting with
/// that many digits exactly gives the nearest, so it wins whenever it round-trips.
fn shortest_round_trip(f: f64) -> String {
    let shortest = format!("{:e}", f);
    let digits = shortest
        .split_once('e')
        .map_or(0, |(m, _)| m.chars().filter(char::is_ascii_digit).count());
    let nearest = format!("{:.*e}", digits.saturating_sub(1), f);
    if nearest != shortest && nearest.parse::<f64>() == Ok(f) {
        nearest
    } else {
        shortest
    }
}

/// Python's `repr(float)`: shortest round-trip digits, scientific below 1e-4 and from 1e16.
pub fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = shortest_round_trip(f);
    let (mantissa, exp) = sci
        .split_once('e')
        .expect("LowerExp always has an exponent");
    let exp: i32 = exp.parse().expect("exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if (point as usize) >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let mant = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mant}e{esign}{:02}", exp.abs())
    }
}

fn number_repr(v: &Value) -> String {
    if v.is_integer() {
        v.to_string()
    } else {
        match f64::try_from(v.clone()) {
            Ok(f) => py_float_repr(f),
            Err(_) => v.to_string(),
        }
    }
}

/// Python's `json.dumps(v, ...)`.
pub fn json_dumps(v: &Value, style: &JsonStyle) -> Result<String, Error> {
    let mut out = String::new();
    write_json(&mut out, v, style, 0)?;
    Ok(out)
}

fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn json_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        py_float_repr(f)
    }
}

fn json_key(k: &Value) -> Result<String, Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => {
            if k.is_true() {
                "true".into()
            } else {
                "false".into()
            }
        }
        ValueKind::None => "null".into(),
        ValueKind::Number if k.is_integer() => k.to_string(),
        ValueKind::Number => json_float(f64::try_from(k.clone()).unwrap_or(f64::NAN)),
        _ => {
            return Err(type_error(format!(
                "keys must be str, int, float, bool or None, not {}",
                py_type_name(k)
            )))
        }
    })
}

fn newline_indent(out: &mut String, style: &JsonStyle, level: usize) {
    if let Some(ind) = &style.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

/// The (key, value) pairs of a map value, in insertion order.
pub fn map_pairs(v: &Value) -> Vec<(Value, Value)> {
    match v.as_object().and_then(|o| o.try_iter_pairs()) {
        Some(iter) => iter.collect(),
        None => Vec::new(),
    }
}

fn write_json(out: &mut String, v: &Value, style: &JsonStyle, level: usize) -> Result<(), Error> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string())
            } else {
                out.push_str(&json_float(f64::try_from(v.clone()).unwrap_or(f64::NAN)))
            }
        }
        ValueKind::String => {
            write_json_str(out, v.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        // Jinja2's map/select/reject and dict views are generators and views, which json.dumps refuses.
        ValueKind::Iterable => {
            return Err(type_error(
                "Object of type generator is not JSON serializable".into(),
            ));
        }
        ValueKind::Seq => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            newline_indent(out, style, level + 1);
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                    newline_indent(out, style, level + 1);
                }
                write_json(out, item, style, level + 1)?;
            }
            newline_indent(out, style, level);
            out.push(']');
        }
        ValueKind::Map if v.as_object().map(|o| o.repr()) == Some(ObjectRepr::Map) => {
            let mut pairs = Vec::new();
            for (k, val) in map_pairs(v) {
                pairs.push((json_key(&k)?, k, val));
            }
            if pairs.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if style.sort_keys {
                if pairs.iter().any(|(_, k, _)| k.kind() != ValueKind::String) {
                    return Err(type_error(
                        "'<' not supported between keys of different types".into(),
                    ));
                }
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            newline_indent(out, style, level + 1);
            for (i, (key, _, val)) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                    newline_indent(out, style, level + 1);
                }
                write_json_str(out, key, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, val, style, level + 1)?;
            }
            newline_indent(out, style, level);
            out.push('}');
        }
        _ => {
            return Err(type_error(format!(
                "Object of type {} is not JSON serializable",
                py_type_name(v)
            )))
        }
    }
    Ok(())
}

/// Python's `str.isprintable()` for one character.
fn is_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    // A code point the running Python does not know is unassigned there: escaped by repr().
    !super::pycase::is_unassigned(c)
        && !matches!(
            get_general_category(c),
            Gc::Control
                | Gc::Format
                | Gc::Surrogate
                | Gc::PrivateUse
                | Gc::Unassigned
                | Gc::LineSeparator
                | Gc::ParagraphSeparator
                | Gc::SpaceSeparator
        )
}

/// Python's `repr(str)`.
pub fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            c if c == quote || c == '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if (c as u32) < 0x7f => out.push(c),
            c if is_printable(c) => out.push(c),
            c if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            c if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push(quote);
    out
}

/// Python's `repr(x)`.
pub fn py_repr(v: &Value) -> String {
    match v.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".into(),
        ValueKind::Bool => {
            if v.is_true() {
                "True".into()
            } else {
                "False".into()
            }
        }
        ValueKind::Number => number_repr(v),
        ValueKind::String => py_str_repr(v.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<String> = v
                .try_iter()
                .map(|it| it.map(|x| py_repr(&x)).collect())
                .unwrap_or_default();
            match (v.is_tuple(), items.len()) {
                (true, 1) => format!("({},)", items[0]),
                (true, _) => format!("({})", items.join(", ")),
                _ => format!("[{}]", items.join(", ")),
            }
        }
        ValueKind::Map if v.as_object().map(|o| o.repr()) == Some(ObjectRepr::Map) => {
            let items: Vec<String> = map_pairs(v)
                .iter()
                .map(|(k, x)| format!("{}: {}", py_repr(k), py_repr(x)))
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        _ => v.to_string(),
    }
}

/// Python's `str(x)`, which is what Jinja2 prints for `{{ x }}` and `x | string`.
pub fn py_str(v: &Value) -> String {
    match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_string(),
        _ => py_repr(v),
    }
}

fn exp_form(f: f64, prec: usize, upper: bool) -> String {
    let s = format!("{:.*e}", prec, f);
    let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let e = if upper { 'E' } else { 'e' };
    format!(
        "{mant}{e}{}{:02}",
        if exp < 0 { '-' } else { '+' },
        exp.abs()
    )
}

/// Python's `%e %f %g` (and upper-case forms) of a float: `sign` is "", "+" or " " for a
/// positive value, `alt` the `#` flag.
pub fn float_format(f: f64, conv: char, plus: &str, alt: bool, prec: usize) -> String {
    let upper = conv.is_ascii_uppercase();
    let sign = if f.is_sign_negative() && !f.is_nan() {
        "-"
    } else {
        plus
    };
    let a = f.abs();
    if !a.is_finite() {
        let s = if a.is_nan() { "nan" } else { "inf" };
        return format!(
            "{sign}{}",
            if upper {
                s.to_uppercase()
            } else {
                s.to_string()
            }
        );
    }
    let body = match conv.to_ascii_lowercase() {
        'e' => {
            let s = exp_form(a, prec, upper);
            if alt && prec == 0 {
                s.replacen(
                    if upper { 'E' } else { 'e' },
                    if upper { ".E" } else { ".e" },
                    1,
                )
            } else {
                s
            }
        }
        'f' => {
            let s = format!("{:.*}", prec, a);
            if alt && prec == 0 {
                format!("{s}.")
            } else {
                s
            }
        }
        _ => {
            let p = prec.max(1);
            let probe = format!("{:.*e}", p - 1, a);
            let x: i64 = probe
                .split_once('e')
                .and_then(|(_, e)| e.parse().ok())
                .unwrap_or(0);
            let mut s = if -4 <= x && x < p as i64 {
                format!("{:.*}", (p as i64 - 1 - x) as usize, a)
            } else {
                exp_form(a, p - 1, upper)
            };
            if !alt {
                let (mant, exp) = match s.find(['e', 'E']) {
                    Some(i) => (s[..i].to_string(), s[i..].to_string()),
                    None => (s.clone(), String::new()),
                };
                let mant = if mant.contains('.') {
                    mant.trim_end_matches('0').trim_end_matches('.').to_string()
                } else {
                    mant
                };
                s = format!("{mant}{exp}");
            } else if !s.contains('.') {
                let i = s.find(['e', 'E']).unwrap_or(s.len());
                s.insert(i, '.');
            }
            s
        }
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_takes_the_nearest_of_two_shortest() {
        // Found by the hypothesis fuzzer (tool-call arguments printed with tojson).
        assert_eq!(py_float_repr(1e15 + 0.3), "1000000000000000.2");
        assert_eq!(py_float_repr(-233891771783429.62), "-233891771783429.62");
    }

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (-2.5, "-2.5"),
            (1e15, "1000000000000000.0"),
            (1.23456, "1.23456"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn json_matches_python_layouts() {
        let v = Value::from_pairs(vec![
            ("b", Value::from(vec![Value::from(1), Value::from(2.5)])),
            ("a", Value::from("é\"\n")),
            ("c", Value::from(())),
        ]);
        let plain = JsonStyle::new(None, None, false, false);
        assert_eq!(
            json_dumps(&v, &plain).unwrap(),
            r#"{"b": [1, 2.5], "a": "é\"\n", "c": null}"#
        );
        let sorted = JsonStyle::new(Some("  ".into()), None, true, true);
        assert_eq!(
            json_dumps(&v, &sorted).unwrap(),
            "{\n  \"a\": \"\\u00e9\\\"\\n\",\n  \"b\": [\n    1,\n    2.5\n  ],\n  \"c\": null\n}"
        );
    }

    #[test]
    fn repr_matches_python() {
        let v = Value::from_pairs(vec![("k", Value::from("it's")), ("t", Value::from(true))]);
        assert_eq!(py_repr(&v), r#"{'k': "it's", 't': True}"#);
        assert_eq!(py_str_repr("a\u{2028}b\x01"), "'a\\u2028b\\x01'");
    }
}
