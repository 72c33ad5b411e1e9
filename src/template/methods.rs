//! Python `str` methods with Python's exact semantics.
//!
//! minijinja-contrib's pycompat covers many methods, but with Rust's notion of whitespace and
//! without some arguments; templates call `strip`, `split`, `rstrip('\n')` on user text, where a
//! different whitespace set changes the rendered bytes. Methods we don't define here fall through
//! to pycompat.

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind, State};
use unicode_general_category::{get_general_category, GeneralCategory as Gc};

use super::pycase;

/// Python's `str.isspace()` set: Rust's White_Space plus the four ASCII separators U+001C..U+001F.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `s.strip(chars)` family. `chars=None` strips Python whitespace.
pub fn py_strip<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
    let pred = |c: char| match chars {
        Some(set) => set.contains(c),
        None => is_py_space(c),
    };
    let mut out = s;
    if left {
        out = out.trim_start_matches(pred);
    }
    if right {
        out = out.trim_end_matches(pred);
    }
    out
}

fn bad_args(method: &str, detail: &str) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("str.{method}(): {detail}"),
    )
}

/// An optional string argument; `None` (Python's None) counts as absent.
fn opt_str<'a>(args: &'a [Value], idx: usize, method: &str) -> Result<Option<&'a str>, Error> {
    match args.get(idx) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| bad_args(method, "argument must be str or None")),
    }
}

fn opt_int(args: &[Value], idx: usize, default: i64) -> i64 {
    args.get(idx).and_then(|v| v.as_i64()).unwrap_or(default)
}

/// Python's `s.split(sep, maxsplit)`.
pub fn py_split(s: &str, sep: Option<&str>, maxsplit: i64) -> Result<Vec<String>, Error> {
    let limit = if maxsplit < 0 {
        usize::MAX
    } else {
        maxsplit as usize
    };
    match sep {
        Some("") => Err(bad_args("split", "empty separator")),
        Some(sep) => {
            let mut parts = Vec::new();
            let mut rest = s;
            while parts.len() < limit {
                match rest.find(sep) {
                    Some(i) => {
                        parts.push(rest[..i].to_string());
                        rest = &rest[i + sep.len()..];
                    }
                    None => break,
                }
            }
            parts.push(rest.to_string());
            Ok(parts)
        }
        None => {
            let mut parts = Vec::new();
            let mut rest = py_strip(s, None, true, false);
            while !rest.is_empty() {
                if parts.len() >= limit {
                    parts.push(rest.to_string());
                    break;
                }
                let end = rest.find(is_py_space).unwrap_or(rest.len());
                parts.push(rest[..end].to_string());
                rest = py_strip(&rest[end..], None, true, false);
            }
            Ok(parts)
        }
    }
}

/// Python's `s.rsplit(sep, maxsplit)`.
pub fn py_rsplit(s: &str, sep: Option<&str>, maxsplit: i64) -> Result<Vec<String>, Error> {
    let limit = if maxsplit < 0 {
        usize::MAX
    } else {
        maxsplit as usize
    };
    let mut parts = Vec::new();
    match sep {
        Some("") => return Err(bad_args("rsplit", "empty separator")),
        Some(sep) => {
            let mut rest = s;
            while parts.len() < limit {
                match rest.rfind(sep) {
                    Some(i) => {
                        parts.push(rest[i + sep.len()..].to_string());
                        rest = &rest[..i];
                    }
                    None => break,
                }
            }
            parts.push(rest.to_string());
        }
        None => {
            let mut rest = py_strip(s, None, false, true);
            while !rest.is_empty() {
                if parts.len() >= limit {
                    parts.push(rest.to_string());
                    break;
                }
                let start = rest
                    .rfind(is_py_space)
                    .map(|i| i + rest[i..].chars().next().map_or(1, char::len_utf8))
                    .unwrap_or(0);
                parts.push(rest[start..].to_string());
                rest = py_strip(&rest[..start], None, false, true);
            }
        }
    }
    parts.reverse();
    Ok(parts)
}

fn strings(v: Vec<String>) -> Value {
    Value::from(v.into_iter().map(Value::from).collect::<Vec<_>>())
}

/// Converts a Python-style char index (may be negative) into a byte offset of `s`.
fn char_to_byte(s: &str, idx: i64) -> usize {
    let n = s.chars().count() as i64;
    let idx = if idx < 0 {
        (n + idx).max(0)
    } else {
        idx.min(n)
    } as usize;
    s.char_indices().nth(idx).map_or(s.len(), |(b, _)| b)
}

fn prefix_test(s: &str, arg: &Value, method: &str, at_start: bool) -> Result<bool, Error> {
    let check = |p: &str| {
        if at_start {
            s.starts_with(p)
        } else {
            s.ends_with(p)
        }
    };
    if let Some(p) = arg.as_str() {
        return Ok(check(p));
    }
    if matches!(arg.kind(), ValueKind::Seq) {
        for item in arg.try_iter()? {
            match item.as_str() {
                Some(p) if check(p) => return Ok(true),
                Some(_) => {}
                None => {
                    return Err(bad_args(
                        method,
                        "tuple for startswith/endswith must only contain str",
                    ))
                }
            }
        }
        return Ok(false);
    }
    Err(bad_args(method, "first arg must be str or a tuple of str"))
}

fn chars_count(s: &str) -> i64 {
    s.chars().count() as i64
}

/// Python's `str.isalpha()` for one character: the `L*` general categories (of the running
/// Python's database).
fn is_py_alpha(c: char) -> bool {
    !pycase::is_unassigned(c)
        && matches!(
            get_general_category(c),
            Gc::UppercaseLetter
                | Gc::LowercaseLetter
                | Gc::TitlecaseLetter
                | Gc::ModifierLetter
                | Gc::OtherLetter
        )
}

/// Python's `str.islower()` / `str.isupper()`: some cased character, none of the other case
/// or titlecase.
fn py_is_case(s: &str, lower: bool) -> bool {
    let mut cased = false;
    for c in s.chars() {
        let (same, other) = if lower {
            (pycase::is_lower(c), pycase::is_upper(c))
        } else {
            (pycase::is_upper(c), pycase::is_lower(c))
        };
        if other || pycase::is_title(c) {
            return false;
        }
        cased |= same;
    }
    cased
}

/// Calls a Python str method, or returns `None` if this module doesn't define it.
pub fn string_method(
    s: &str,
    method: &str,
    args: &[Value],
    check: &dyn Fn(usize) -> Result<(), Error>,
) -> Option<Result<Value, Error>> {
    let result = (|| -> Result<Value, Error> {
        Ok(match method {
            "strip" => Value::from(py_strip(s, opt_str(args, 0, method)?, true, true)),
            "lstrip" => Value::from(py_strip(s, opt_str(args, 0, method)?, true, false)),
            "rstrip" => Value::from(py_strip(s, opt_str(args, 0, method)?, false, true)),
            "split" => strings(py_split(
                s,
                opt_str(args, 0, method)?,
                opt_int(args, 1, -1),
            )?),
            "rsplit" => strings(py_rsplit(
                s,
                opt_str(args, 0, method)?,
                opt_int(args, 1, -1),
            )?),
            "startswith" | "endswith" => {
                let arg = args
                    .first()
                    .ok_or_else(|| bad_args(method, "missing argument"))?;
                let start = char_to_byte(s, opt_int(args, 1, 0));
                let end = args
                    .get(2)
                    .and_then(|v| v.as_i64())
                    .map_or(s.len(), |e| char_to_byte(s, e));
                let window = if start <= end { &s[start..end] } else { "" };
                Value::from(prefix_test(window, arg, method, method == "startswith")?)
            }
            "replace" => {
                let old =
                    opt_str(args, 0, method)?.ok_or_else(|| bad_args(method, "missing old"))?;
                let new =
                    opt_str(args, 1, method)?.ok_or_else(|| bad_args(method, "missing new"))?;
                let count = opt_int(args, 2, -1);
                let hits = if old.is_empty() {
                    chars_count(s) as usize + 1
                } else {
                    s.matches(old).count()
                };
                let hits = if count < 0 {
                    hits
                } else {
                    hits.min(count as usize)
                };
                check(s.len() + hits * new.len().saturating_sub(old.len()))?;
                if count < 0 {
                    Value::from(s.replace(old, new))
                } else {
                    Value::from(s.replacen(old, new, count as usize))
                }
            }
            "removeprefix" => {
                let p = opt_str(args, 0, method)?.unwrap_or("");
                Value::from(s.strip_prefix(p).unwrap_or(s))
            }
            "removesuffix" => {
                let p = opt_str(args, 0, method)?.unwrap_or("");
                Value::from(s.strip_suffix(p).unwrap_or(s))
            }
            "partition" | "rpartition" => {
                let sep = opt_str(args, 0, method)?
                    .ok_or_else(|| bad_args(method, "missing separator"))?;
                if sep.is_empty() {
                    return Err(bad_args(method, "empty separator"));
                }
                let found = if method == "partition" {
                    s.find(sep)
                } else {
                    s.rfind(sep)
                };
                let parts = match found {
                    Some(i) => [&s[..i], sep, &s[i + sep.len()..]],
                    None if method == "partition" => [s, "", ""],
                    None => ["", "", s],
                };
                Value::from(minijinja::value::Tuple::from(
                    parts.iter().map(|p| Value::from(*p)).collect::<Vec<_>>(),
                ))
            }
            "find" | "rfind" | "index" | "rindex" => {
                let sub = opt_str(args, 0, method)?
                    .ok_or_else(|| bad_args(method, "missing substring"))?;
                let start = char_to_byte(s, opt_int(args, 1, 0));
                let end = args
                    .get(2)
                    .and_then(|v| v.as_i64())
                    .map_or(s.len(), |e| char_to_byte(s, e));
                let window = if start <= end { &s[start..end] } else { "" };
                let hit = if method.starts_with('r') {
                    window.rfind(sub)
                } else {
                    window.find(sub)
                };
                match hit {
                    Some(b) => Value::from(chars_count(&s[..start + b])),
                    None if method.ends_with("find") => Value::from(-1),
                    None => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "substring not found",
                        ))
                    }
                }
            }
            "count" => {
                let sub = opt_str(args, 0, method)?
                    .ok_or_else(|| bad_args(method, "missing substring"))?;
                if sub.is_empty() {
                    Value::from(chars_count(s) + 1)
                } else {
                    Value::from(s.matches(sub).count() as i64)
                }
            }
            "zfill" => {
                let width = opt_int(args, 0, 0);
                check(width.max(0) as usize)?;
                let n = chars_count(s);
                if width <= n {
                    Value::from(s)
                } else {
                    let pad = "0".repeat((width - n) as usize);
                    match s.chars().next() {
                        Some(c @ ('+' | '-')) => Value::from(format!("{c}{pad}{}", &s[1..])),
                        _ => Value::from(format!("{pad}{s}")),
                    }
                }
            }
            "capitalize" => Value::from(pycase::py_capitalize(s)),
            "title" => Value::from(pycase::py_title(s)),
            "upper" => Value::from(pycase::py_upper(s)),
            "lower" => Value::from(pycase::py_lower(s)),
            "casefold" => Value::from(pycase::py_casefold(s)),
            "isalpha" => Value::from(!s.is_empty() && s.chars().all(is_py_alpha)),
            "islower" => Value::from(py_is_case(s, true)),
            "isupper" => Value::from(py_is_case(s, false)),
            "swapcase" => Value::from(pycase::py_swapcase(s)),
            _ => return Err(Error::from(ErrorKind::UnknownMethod)),
        })
    })();
    match result {
        Err(e) if e.kind() == ErrorKind::UnknownMethod => None,
        other => Some(other),
    }
}

/// The environment's unknown-method callback: our exact str methods first, then pycompat.
pub fn unknown_method(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        let check = |size: usize| super::check_value_size(state, size);
        if let Some(result) = string_method(s, method, args, &check) {
            return result;
        }
        // pycompat's `join` and `format` build one value: its size is checked before.
        if method == "join" {
            if let Some(items) = args.first() {
                let mut size = 0usize;
                let mut n = 0usize;
                for item in items.try_iter()? {
                    size = size.saturating_add(item.as_str().map_or(0, str::len));
                    n += 1;
                }
                check(size.saturating_add(s.len().saturating_mul(n.saturating_sub(1))))?;
            }
        } else if method == "format" {
            for digits in s
                .split(|c: char| !c.is_ascii_digit())
                .filter(|d| d.len() > 6)
            {
                check(digits.parse::<usize>().unwrap_or(usize::MAX))?;
            }
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// Jinja2's `|title`: words start after runs of `-`, whitespace (Python's, so `\x1c`-`\x1f`
/// too), `(`, `{`, `[`, `<`; each piece's first character is uppered, the rest lowered.
pub fn title_filter(value: &Value) -> String {
    let s = super::pyfmt::py_str(value);
    let is_sep = |c: char| matches!(c, '-' | '(' | '{' | '[' | '<') || is_py_space(c);
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while !rest.is_empty() {
        let sep_len = rest.find(|c: char| !is_sep(c)).unwrap_or(rest.len());
        let (piece, tail) = if sep_len > 0 {
            rest.split_at(sep_len)
        } else {
            rest.split_at(rest.find(is_sep).unwrap_or(rest.len()))
        };
        let mut chars = piece.chars();
        if let Some(first) = chars.next() {
            // `item[0].upper() + item[1:].lower()`: uppercase, not titlecase.
            pycase::push_upper(first, &mut out);
            out.push_str(&pycase::py_lower(chars.as_str()));
        }
        rest = tail;
    }
    out
}

/// Jinja2's `|wordcount`: matches of Python's `\w+` (letters, digits, numerics and `_`).
pub fn wordcount(value: &Value) -> usize {
    let s = super::pyfmt::py_str(value);
    let is_word = |c: char| {
        c == '_'
            || !pycase::is_unassigned(c)
                && matches!(
                    get_general_category(c),
                    Gc::UppercaseLetter
                        | Gc::LowercaseLetter
                        | Gc::TitlecaseLetter
                        | Gc::ModifierLetter
                        | Gc::OtherLetter
                        | Gc::DecimalNumber
                        | Gc::LetterNumber
                        | Gc::OtherNumber
                )
    };
    let mut count = 0;
    let mut in_word = false;
    for c in s.chars() {
        let w = is_word(c);
        if w && !in_word {
            count += 1;
        }
        in_word = w;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_strip_follow_python() {
        assert_eq!(py_split("  a \x1c b  ", None, -1).unwrap(), vec!["a", "b"]);
        assert_eq!(
            py_split("a,b,,c", Some(","), 2).unwrap(),
            vec!["a", "b", ",c"]
        );
        assert_eq!(py_rsplit("a b c", None, 1).unwrap(), vec!["a b", "c"]);
        assert_eq!(py_strip("\u{1f} x \u{a0}", None, true, true), "x");
        assert_eq!(py_strip("\n\nx\n", Some("\n"), true, false), "x\n");
    }
}
