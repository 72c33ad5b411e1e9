//! Python's `%` operator: printf-style string formatting and Python's numeric modulo.
//!
//! minijinja has no string `%`; every `a % b` in a template is rewritten (with minijinja's own
//! parser) to `_chatmask_percent(a, b, kind)`, where `kind` says what the right-hand side was
//! written as: a tuple literal `(x, y)` (the arguments), a list literal (one argument), or
//! anything else. The formatting follows CPython's `unicode_format` state machine: the
//! conversions `s r a d i u o x X e E f F g G c %`, the flags `#0- +`, width and precision
//! (`*` too), `%(key)` lookups, and Python's errors (as template errors).

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind, State};

use super::pyfmt::{float_format, py_repr, py_str, py_type_name};

/// How the right-hand side of `%` was written in the template.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RhsKind {
    Tuple,
    List,
    Other,
}

impl RhsKind {
    pub fn from_code(code: i64) -> RhsKind {
        match code {
            1 => RhsKind::Tuple,
            2 => RhsKind::List,
            _ => RhsKind::Other,
        }
    }
}

fn type_err(msg: impl Into<String>) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("TypeError: {}", msg.into()),
    )
}

fn value_err(msg: impl Into<String>) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!("ValueError: {}", msg.into()),
    )
}

/// `a % b` with Python's semantics.
pub fn percent(state: &State, lhs: &Value, rhs: &Value, kind: RhsKind) -> Result<Value, Error> {
    if let Some(fmt) = lhs.as_str() {
        if lhs.is_safe() {
            // Jinja2's Markup escapes the arguments and stays Markup; not rendered natively.
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "chatmask does not render `%` on a |safe string natively (Jinja2's Markup escapes the arguments)",
            ));
        }
        return format(fmt, rhs, kind, &|size| super::check_value_size(state, size))
            .map(Value::from);
    }
    numeric_mod(lhs, rhs)
}

enum Num {
    Int(i128),
    Float(f64),
}

fn as_num(v: &Value) -> Option<Num> {
    match v.kind() {
        ValueKind::Bool => Some(Num::Int(v.is_true() as i128)),
        ValueKind::Number if v.is_integer() => i128::try_from(v.clone()).ok().map(Num::Int),
        ValueKind::Number => f64::try_from(v.clone()).ok().map(Num::Float),
        _ => None,
    }
}

fn numeric_mod(lhs: &Value, rhs: &Value) -> Result<Value, Error> {
    let (Some(a), Some(b)) = (as_num(lhs), as_num(rhs)) else {
        return Err(type_err(format!(
            "unsupported operand type(s) for %: '{}' and '{}'",
            py_type_name(lhs),
            py_type_name(rhs)
        )));
    };
    match (a, b) {
        (Num::Int(_), Num::Int(0)) => Err(Error::new(
            ErrorKind::InvalidOperation,
            "ZeroDivisionError: integer modulo by zero",
        )),
        (Num::Int(a), Num::Int(b)) => {
            let r = a.checked_rem(b).unwrap_or(0);
            let r = if r != 0 && ((r < 0) != (b < 0)) {
                r + b
            } else {
                r
            };
            Ok(Value::from(r))
        }
        (a, b) => {
            let to_f = |n: Num| match n {
                Num::Int(i) => i as f64,
                Num::Float(f) => f,
            };
            let (x, w) = (to_f(a), to_f(b));
            if w == 0.0 {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "ZeroDivisionError: float modulo",
                ));
            }
            let mut m = x % w;
            if m != 0.0 {
                if (w < 0.0) != (m < 0.0) {
                    m += w;
                }
            } else {
                m = 0.0f64.copysign(w);
            }
            Ok(Value::from(m))
        }
    }
}

/// CPython's argument cursor: a tuple's items one by one, or the single value once.
struct Args<'a> {
    tuple: Option<Vec<Value>>,
    single: &'a Value,
    idx: isize,
    len: isize,
    current: Option<Value>,
}

impl Args<'_> {
    fn next(&mut self) -> Result<Value, Error> {
        if self.idx < self.len {
            let i = self.idx;
            self.idx += 1;
            if self.len < 0 {
                return Ok(self.current.clone().unwrap_or_else(|| self.single.clone()));
            }
            return Ok(self
                .tuple
                .as_ref()
                .map(|t| t[i as usize].clone())
                .unwrap_or_default());
        }
        Err(type_err("not enough arguments for format string"))
    }
}

const F_LJUST: u8 = 1;
const F_SIGN: u8 = 2;
const F_BLANK: u8 = 4;
const F_ALT: u8 = 8;
const F_ZERO: u8 = 16;

fn format(
    fmt: &str,
    rhs: &Value,
    kind: RhsKind,
    check: &dyn Fn(usize) -> Result<(), Error>,
) -> Result<String, Error> {
    let kind = if rhs.is_tuple() { RhsKind::Tuple } else { kind };
    let is_mapping = match kind {
        RhsKind::Tuple => false,
        RhsKind::List => true, // a list has __getitem__: Python takes it as a mapping too
        RhsKind::Other => match rhs.kind() {
            ValueKind::Map => true,
            ValueKind::Seq | ValueKind::Iterable => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "chatmask cannot tell whether the right side of this `%` is a Python tuple (its arguments) or a \
                     list (one argument); write it as a tuple or list literal",
                ))
            }
            _ => false,
        },
    };
    let mut args = Args {
        tuple: None,
        single: rhs,
        idx: -2,
        len: -1,
        current: None,
    };
    if kind == RhsKind::Tuple {
        let items: Vec<Value> = rhs.try_iter()?.collect();
        args.len = items.len() as isize;
        args.idx = 0;
        args.tuple = Some(items);
    }
    let chars: Vec<char> = fmt.chars().collect();
    let mut out = String::with_capacity(fmt.len());
    let mut pos = 0;
    while pos < chars.len() {
        if chars[pos] != '%' {
            out.push(chars[pos]);
            pos += 1;
            continue;
        }
        pos += 1;
        if pos < chars.len() && chars[pos] == '%' {
            out.push('%');
            pos += 1;
            continue;
        }
        // %(key)
        if pos < chars.len() && chars[pos] == '(' {
            if !is_mapping {
                return Err(type_err("format requires a mapping"));
            }
            let mut depth = 1;
            let start = pos + 1;
            pos += 1;
            while pos < chars.len() && depth > 0 {
                match chars[pos] {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                pos += 1;
            }
            if depth > 0 {
                return Err(value_err("incomplete format key"));
            }
            let key: String = chars[start..pos - 1].iter().collect();
            let found = lookup(rhs, kind, &key)?;
            args.current = Some(found);
            args.len = -1;
            args.idx = -2;
            args.tuple = None;
        }
        let mut flags = 0u8;
        while pos < chars.len() {
            flags |= match chars[pos] {
                '-' => F_LJUST,
                '+' => F_SIGN,
                ' ' => F_BLANK,
                '#' => F_ALT,
                '0' => F_ZERO,
                _ => break,
            };
            pos += 1;
        }
        let mut width: i64 = -1;
        if pos < chars.len() && chars[pos] == '*' {
            let w = args.next()?;
            width = star_int(&w)?;
            if width < 0 {
                flags |= F_LJUST;
                width = -width;
            }
            pos += 1;
        } else {
            while pos < chars.len() && chars[pos].is_ascii_digit() {
                width = width
                    .max(0)
                    .checked_mul(10)
                    .and_then(|w| w.checked_add(chars[pos] as i64 - '0' as i64))
                    .ok_or_else(|| value_err("width too big"))?;
                pos += 1;
            }
        }
        let mut prec: i64 = -1;
        if pos < chars.len() && chars[pos] == '.' {
            pos += 1;
            prec = 0;
            if pos < chars.len() && chars[pos] == '*' {
                let p = args.next()?;
                prec = star_int(&p)?.max(0);
                pos += 1;
            } else {
                while pos < chars.len() && chars[pos].is_ascii_digit() {
                    prec = prec
                        .checked_mul(10)
                        .and_then(|w| w.checked_add(chars[pos] as i64 - '0' as i64))
                        .ok_or_else(|| value_err("precision too big"))?;
                    pos += 1;
                }
            }
        }
        while pos < chars.len() && matches!(chars[pos], 'h' | 'l' | 'L') {
            pos += 1;
        }
        let Some(&conv) = chars.get(pos) else {
            return Err(value_err("incomplete format"));
        };
        let conv_index = pos;
        pos += 1;
        check(width.max(prec).max(0) as usize)?; // a width or precision over the output limit
        let arg = args.next()?;
        let (body, numeric) = convert(conv, conv_index, &arg, flags, prec)?;
        pad(&mut out, &body, numeric, flags, width);
    }
    if args.idx < args.len && !is_mapping {
        return Err(type_err(
            "not all arguments converted during string formatting",
        ));
    }
    Ok(out)
}

fn lookup(rhs: &Value, kind: RhsKind, key: &str) -> Result<Value, Error> {
    if kind == RhsKind::List || rhs.kind() != ValueKind::Map {
        return Err(type_err(format!(
            "{} indices must be integers or slices, not str",
            py_type_name(rhs)
        )));
    }
    match rhs.get_item(&Value::from(key)) {
        Ok(v) if !v.is_undefined() => Ok(v),
        _ => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("KeyError: {}", super::pyfmt::py_str_repr(key)),
        )),
    }
}

fn star_int(v: &Value) -> Result<i64, Error> {
    match v.kind() {
        ValueKind::Bool => Ok(v.is_true() as i64),
        ValueKind::Number if v.is_integer() => v.as_i64().ok_or_else(|| value_err("width too big")),
        _ => Err(type_err("* wants int")),
    }
}

/// The converted text and whether it is a number (zero padding applies to numbers only).
fn convert(
    conv: char,
    index: usize,
    arg: &Value,
    flags: u8,
    prec: i64,
) -> Result<(String, bool), Error> {
    Ok(match conv {
        's' | 'r' | 'a' => {
            let mut s = match conv {
                's' => py_str(arg),
                'r' => py_repr(arg),
                _ => ascii(&py_repr(arg)),
            };
            if prec >= 0 {
                s = s.chars().take(prec as usize).collect();
            }
            (s, false)
        }
        'd' | 'i' | 'u' | 'o' | 'x' | 'X' => {
            let n = match as_num(arg) {
                Some(Num::Int(i)) => i,
                Some(Num::Float(f)) if conv == 'd' || conv == 'i' || conv == 'u' => {
                    if !f.is_finite() {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            if f.is_nan() {
                                "ValueError: cannot convert float NaN to integer"
                            } else {
                                "OverflowError: cannot convert float infinity to integer"
                            },
                        ));
                    }
                    let t = f.trunc();
                    let digits = if t == 0.0 {
                        "0".to_string()
                    } else {
                        format!("{t:.0}")
                    };
                    return Ok((sign_and_digits(&digits, flags, prec, ""), true));
                }
                _ if conv == 'd' || conv == 'i' || conv == 'u' => {
                    return Err(type_err(format!(
                        "%{conv} format: a real number is required, not {}",
                        py_type_name(arg)
                    )))
                }
                _ => {
                    return Err(type_err(format!(
                        "%{conv} format: an integer is required, not {}",
                        py_type_name(arg)
                    )))
                }
            };
            let (digits, prefix) = match conv {
                'o' => (
                    format!("{:o}", n.unsigned_abs()),
                    if flags & F_ALT != 0 { "0o" } else { "" },
                ),
                'x' => (
                    format!("{:x}", n.unsigned_abs()),
                    if flags & F_ALT != 0 { "0x" } else { "" },
                ),
                'X' => (
                    format!("{:X}", n.unsigned_abs()),
                    if flags & F_ALT != 0 { "0X" } else { "" },
                ),
                _ => (n.unsigned_abs().to_string(), ""),
            };
            let digits = if n < 0 { format!("-{digits}") } else { digits };
            (sign_and_digits(&digits, flags, prec, prefix), true)
        }
        'e' | 'E' | 'f' | 'F' | 'g' | 'G' => {
            let f = match as_num(arg) {
                Some(Num::Int(i)) => i as f64,
                Some(Num::Float(f)) => f,
                None => {
                    return Err(type_err(format!(
                        "must be real number, not {}",
                        py_type_name(arg)
                    )))
                }
            };
            let plus = if flags & F_SIGN != 0 {
                "+"
            } else if flags & F_BLANK != 0 {
                " "
            } else {
                ""
            };
            (
                float_format(
                    f,
                    conv,
                    plus,
                    flags & F_ALT != 0,
                    if prec < 0 { 6 } else { prec as usize },
                ),
                true,
            )
        }
        'c' => {
            let c = match arg.kind() {
                ValueKind::String => {
                    let s = arg.as_str().unwrap_or_default();
                    let mut it = s.chars();
                    match (it.next(), it.next()) {
                        (Some(c), None) => c,
                        _ => return Err(type_err("%c requires int or char")),
                    }
                }
                ValueKind::Bool | ValueKind::Number
                    if arg.is_integer() || arg.kind() == ValueKind::Bool =>
                {
                    let n = match as_num(arg) {
                        Some(Num::Int(i)) => i,
                        _ => return Err(type_err("%c requires int or char")),
                    };
                    if !(0..0x110000).contains(&n) {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "OverflowError: %c arg not in range(0x110000)",
                        ));
                    }
                    char::from_u32(n as u32).ok_or_else(|| {
                        Error::new(
                            ErrorKind::InvalidOperation,
                            "chatmask cannot represent a lone surrogate from %c",
                        )
                    })?
                }
                _ => return Err(type_err("%c requires int or char")),
            };
            (c.to_string(), false)
        }
        other => {
            return Err(value_err(format!(
                "unsupported format character '{}' (0x{:x}) at index {index}",
                other, other as u32
            )))
        }
    })
}

/// Sign, prefix and digits of an integer conversion (`digits` may start with '-').
fn sign_and_digits(digits: &str, flags: u8, prec: i64, prefix: &str) -> String {
    let (neg, digits) = match digits.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, digits),
    };
    let mut body = String::new();
    body.push_str(if neg {
        "-"
    } else if flags & F_SIGN != 0 {
        "+"
    } else if flags & F_BLANK != 0 {
        " "
    } else {
        ""
    });
    body.push_str(prefix);
    if prec > digits.len() as i64 {
        body.push_str(&"0".repeat(prec as usize - digits.len()));
    }
    body.push_str(digits);
    body
}

/// Width padding; zero padding goes after the sign and the `0x` prefix, numbers only.
fn pad(out: &mut String, body: &str, numeric: bool, flags: u8, width: i64) {
    let len = body.chars().count() as i64;
    if width <= len {
        out.push_str(body);
        return;
    }
    let fill = (width - len) as usize;
    if flags & F_LJUST != 0 {
        out.push_str(body);
        out.push_str(&" ".repeat(fill));
    } else if numeric && flags & F_ZERO != 0 {
        let mut rest = body;
        if let Some(c) = rest.chars().next().filter(|c| matches!(c, '-' | '+' | ' ')) {
            out.push(c);
            rest = &rest[1..];
        }
        for p in ["0x", "0X", "0o"] {
            if let Some(r) = rest.strip_prefix(p) {
                out.push_str(p);
                rest = r;
                break;
            }
        }
        out.push_str(&"0".repeat(fill));
        out.push_str(rest);
    } else {
        out.push_str(&" ".repeat(fill));
        out.push_str(body);
    }
}

/// Python's `ascii()` of a repr: non-ASCII characters escaped.
fn ascii(repr: &str) -> String {
    let mut out = String::with_capacity(repr.len());
    for c in repr.chars() {
        let n = c as u32;
        if n < 0x80 {
            out.push(c);
        } else if n <= 0xff {
            out.push_str(&format!("\\x{n:02x}"));
        } else if n <= 0xffff {
            out.push_str(&format!("\\u{n:04x}"));
        } else {
            out.push_str(&format!("\\U{n:08x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(f: &str, args: Vec<Value>) -> String {
        format(f, &Value::from(args), RhsKind::Tuple, &|_| Ok(())).unwrap()
    }

    #[test]
    fn formats_like_python() {
        assert_eq!(
            fmt(
                "%05.3d|%-5s|%+.2f|%#x|%g|%e",
                vec![
                    5.into(),
                    "ab".into(),
                    2.255.into(),
                    255.into(),
                    1e-5.into(),
                    0.0.into()
                ]
            ),
            "00005|ab   |+2.25|0xff|1e-05|0.000000e+00"
        );
        assert_eq!(
            fmt(
                "%*s|%.*s|%c%c|%%",
                vec![
                    (-4).into(),
                    "a".into(),
                    (-2).into(),
                    "abc".into(),
                    65.into(),
                    "b".into()
                ]
            ),
            "a   ||Ab|%"
        );
        assert_eq!(
            fmt(
                "%#.0e %#g %.3g %05f %r",
                vec![
                    1.0.into(),
                    1.0.into(),
                    1234567.into(),
                    f64::INFINITY.into(),
                    "é".into()
                ]
            ),
            "1.e+00 1.00000 1.23e+06 00inf 'é'"
        );
        let map = Value::from_pairs(vec![("a", Value::from(1))]);
        assert_eq!(
            format("%s %(a)s", &map, RhsKind::Other, &|_| Ok(())).unwrap(),
            "{'a': 1} 1"
        );
        assert!(format(
            "%s",
            &Value::from(vec![Value::from(1)]),
            RhsKind::Other,
            &|_| Ok(())
        )
        .is_err());
        assert_eq!(
            format(
                "abc",
                &Value::from(Vec::<Value>::new()),
                RhsKind::List,
                &|_| Ok(())
            )
            .unwrap(),
            "abc"
        );
        assert!(format("abc", &Value::from(5), RhsKind::Other, &|_| Ok(())).is_err());
        assert!(format("%z", &Value::from(5), RhsKind::Other, &|_| Ok(()))
            .unwrap_err()
            .to_string()
            .contains("at index 1"));
    }

    #[test]
    fn modulo_like_python() {
        let m = |a: Value, b: Value| numeric_mod(&a, &b).unwrap().to_string();
        assert_eq!(m((-7).into(), 3.into()), "2");
        assert_eq!(m(7.into(), (-3).into()), "-2");
        assert_eq!(m((-7.5).into(), 2.into()), "0.5");
        assert!(numeric_mod(&Value::from(1), &Value::from(0)).is_err());
    }
}
