//! Two Jinja2 values minijinja has no equivalent for, rendered natively.
//!
//! * **Markup** (`|safe`): in Jinja2 `x|safe` is a `markupsafe.Markup`, and `Markup + str`
//!   (either order) HTML-escapes the plain operand; the result is Markup again, printed as is
//!   (transformers renders with autoescape off). minijinja keeps a "safe" flag on strings but
//!   does not escape on `+` without autoescape, so templates that use `|safe` get every `+`
//!   rewritten to `_chatmask_add` (see `rewrite.rs`), and every `~` to `_chatmask_concat`
//!   (Jinja2's `~` joins to a plain `str`, minijinja's would keep two safe sides safe).
//!
//! * **Bound methods** read as attributes (`spec.items` without a call): Jinja2's sandbox
//!   `getattr` finds the dict's method before its key. The rewrite turns such reads into
//!   `_chatmask_attr(x, 'items')`, which yields a [`BoundMethod`]: true, defined, not iterable,
//!   without attributes or items, and callable like the method. Jinja2 prints it with its memory
//!   address (`<built-in method items of dict object at 0x7f...>`), which cannot be reproduced,
//!   so printing one raises. Methods the immutable sandbox refuses (`pop`, `update`, ...) read as
//!   undefined there, and here.

use std::fmt;
use std::sync::{Arc, OnceLock};

use minijinja::value::{Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};

/// markupsafe's `escape` of a plain string.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&#39;"),
            '"' => out.push_str("&#34;"),
            c => out.push(c),
        }
    }
    out
}

/// minijinja's own `+`, for the operands Markup does not involve: evaluated through a compiled
/// expression because minijinja's operator functions are private.
fn plain_add(a: Value, b: Value) -> Result<Value, Error> {
    static ENV: OnceLock<Environment<'static>> = OnceLock::new();
    static EXPR: OnceLock<minijinja::Expression<'static, 'static>> = OnceLock::new();
    let expr = EXPR.get_or_init(|| {
        ENV.get_or_init(Environment::new)
            .compile_expression_owned("a + b")
            .expect("a constant expression")
    });
    expr.eval(minijinja::context! { a => a, b => b })
}

/// Jinja2's `a + b` when `a` or `b` may be Markup.
pub fn add(state: &State, a: Value, b: Value) -> Result<Value, Error> {
    let (a_safe, b_safe) = (a.is_safe(), b.is_safe());
    if !a_safe && !b_safe {
        if let (Some(l), Some(r)) = (a.as_str(), b.as_str()) {
            super::check_value_size(state, l.len() + r.len())?;
            return Ok(Value::from(format!("{l}{r}")));
        }
        return plain_add(a, b);
    }
    // Markup.__add__/__radd__ take only str (escaped unless Markup already); else TypeError.
    let (Some(l), Some(r)) = (a.as_str(), b.as_str()) else {
        return Err(super::pyfmt::type_error(format!(
            "unsupported operand type(s) for +: '{}' and '{}'",
            type_name(&a),
            type_name(&b)
        )));
    };
    super::check_value_size(state, l.len() + r.len())?;
    let part = |s: &str, safe: bool| if safe { s.to_string() } else { html_escape(s) };
    let joined = part(l, a_safe) + &part(r, b_safe);
    super::check_value_size(state, joined.len())?;
    Ok(Value::from_safe_string(joined))
}

/// Jinja2's `a ~ b` with autoescape off: `str(a) + str(b)`, a plain string (undefined prints
/// as nothing).
pub fn concat(state: &State, a: Value, b: Value) -> Result<Value, Error> {
    let (l, r) = (super::pyfmt::py_str(&a), super::pyfmt::py_str(&b));
    super::check_value_size(state, l.len() + r.len())?;
    Ok(Value::from(l + &r))
}

fn type_name(v: &Value) -> &'static str {
    if v.is_safe() {
        return "Markup";
    }
    match v.kind() {
        ValueKind::Undefined => "Undefined",
        ValueKind::None => "NoneType",
        ValueKind::Bool => "bool",
        ValueKind::Number if v.as_i64().is_some() => "int",
        ValueKind::Number => "float",
        ValueKind::String => "str",
        ValueKind::Seq => "list",
        ValueKind::Map => "dict",
        _ => "object",
    }
}

/// Jinja2's `|safe`: `Markup(value)`, the value printed the Python way (`None`, `True`).
pub fn mark_safe(value: Value) -> Value {
    if value.is_safe() {
        return value;
    }
    Value::from_safe_string(super::pyfmt::py_str(&value))
}

/// `text` as Markup if `source` was Markup (Jinja2's string filters keep Markup), else plain.
pub fn like(source: &Value, text: String) -> Value {
    if source.is_safe() {
        Value::from_safe_string(text)
    } else {
        Value::from(text)
    }
}

/// A dict's (or list's) method read without a call.
#[derive(Debug)]
pub struct BoundMethod {
    receiver: Value,
    name: String,
    owner: &'static str,
}

impl BoundMethod {
    pub fn printed_error(&self) -> Error {
        Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "printing `{}` (a {} method read without a call): Jinja2 prints the bound method with its \
                 memory address, which chatmask cannot reproduce",
                self.name, self.owner
            ),
        )
    }
}

impl Object for BoundMethod {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    /// `method.type` and `method['type']` are undefined in Jinja2 (no such attribute, and a
    /// builtin method is not subscriptable, which the sandbox turns into undefined).
    fn get_value(self: &Arc<Self>, _key: &Value) -> Option<Value> {
        None
    }

    fn is_true(self: &Arc<Self>) -> bool {
        true
    }

    fn call(self: &Arc<Self>, state: &mut State<'_, '_>, args: &[Value]) -> Result<Value, Error> {
        self.receiver.call_method(state, &self.name, args)
    }

    /// Used where minijinja formats without our formatter (`~` outside `|safe` templates):
    /// Jinja2's text without the address.
    fn render(self: &Arc<Self>, f: &mut fmt::Formatter<'_>) -> fmt::Result
    where
        Self: Sized + 'static,
    {
        write!(
            f,
            "<built-in method {} of {} object>",
            self.name, self.owner
        )
    }
}

/// Methods of `dict` the immutable sandbox exposes; the other names it refuses (undefined).
const DICT_METHODS: &[&str] = &["items", "keys", "values", "get", "copy", "fromkeys"];
const DICT_MUTATORS: &[&str] = &["pop", "popitem", "setdefault", "update", "clear"];
/// Of the names above, the ones `list` has too.
const LIST_METHODS: &[&str] = &["copy"];
const LIST_MUTATORS: &[&str] = &["pop", "clear"];

/// The names the rewrite routes through [`attr`].
pub fn is_method_name(name: &str) -> bool {
    DICT_METHODS.contains(&name) || DICT_MUTATORS.contains(&name)
}

/// Jinja2's `value.name` for a name of [`is_method_name`].
pub fn attr(value: Value, name: &str) -> Result<Value, Error> {
    // Only plain dicts and lists: namespaces, `loop` and other objects keep attribute access.
    let owner = if value
        .downcast_object_ref::<indexmap::IndexMap<Value, Value>>()
        .is_some()
    {
        Some(("dict", DICT_METHODS, DICT_MUTATORS))
    } else if value.downcast_object_ref::<Vec<Value>>().is_some() {
        Some(("list", LIST_METHODS, LIST_MUTATORS))
    } else {
        None
    };
    match owner {
        Some((owner, methods, _)) if methods.contains(&name) => {
            Ok(Value::from_object(BoundMethod {
                receiver: value,
                name: name.to_string(),
                owner,
            }))
        }
        Some((_, _, mutators)) if mutators.contains(&name) => Ok(Value::UNDEFINED),
        _ => value.get_attr(name),
    }
}
