//! The chat-template engine: minijinja configured to render like transformers' Jinja2 sandbox.
//!
//! One [`ChatTemplate`] per template source. It knows nothing about tokens.

mod globals;
mod methods;
mod printf;
pub mod pycase;
pub mod pyfmt;
mod pyvalues;
mod rewrite;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use minijinja::value::{Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{Environment, Error as JinjaError, ErrorKind, State};

use crate::error::Error;
pub use globals::MARKERS_VAR;
use globals::{
    generation_block, generator, indent, is_iterable, is_sequence, iterable_or_raise, join,
    python_string, raise_exception, strftime_now, tojson, trim,
};

const TEMPLATE_NAME: &str = "chat_template";

/// Raised by the template's `raise_exception(...)`; carried as the source of a minijinja error
/// so the message reaches the user unchanged.
#[derive(Debug)]
struct TemplateRaised(String);

impl fmt::Display for TemplateRaised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateRaised {}

/// Bounds on one render: chat templates come from the Hub and are untrusted code.
///
/// Fuel is minijinja's instruction budget (it also charges for the values a template builds);
/// the recursion limit counts nested loops, ifs and macro calls (a macro call costs more than
/// one level); the output limit caps the rendered text in bytes. `None` means unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenderLimits {
    pub fuel: Option<u64>,
    pub max_recursion: usize,
    pub max_output_bytes: Option<usize>,
}

impl Default for RenderLimits {
    /// Generous for real templates (the fixture corpus renders well inside them, see
    /// `real_templates_fit_the_default_limits`) while a runaway template stops within about a
    /// second.
    fn default() -> Self {
        RenderLimits {
            fuel: Some(10_000_000),
            max_recursion: 500,
            max_output_bytes: Some(64 << 20),
        }
    }
}

/// Carried as the source of minijinja's write error when the output limit is hit.
#[derive(Debug)]
struct OutputLimitExceeded(usize);

impl fmt::Display for OutputLimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rendered output exceeds {} bytes", self.0)
    }
}

impl std::error::Error for OutputLimitExceeded {}

/// The global holding `max_output_bytes` for the functions that build one large value
/// (`%` widths, `replace`, `zfill`, `join`, `format`): no single value may exceed it.
const VALUE_LIMIT_VAR: &str = "__chatmask_value_limit";

/// Refuses a value of `size` bytes over the output limit, reported as that limit.
pub(crate) fn check_value_size(state: &State, size: usize) -> Result<(), JinjaError> {
    let Some(limit) = state.lookup(VALUE_LIMIT_VAR).and_then(|v| v.as_usize()) else {
        return Ok(());
    };
    if size > limit {
        return Err(JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("a value of {size} bytes exceeds the output limit"),
        )
        .with_source(OutputLimitExceeded(limit)));
    }
    Ok(())
}

/// An `io::Write` into a buffer that refuses to grow past `limit` bytes.
struct BoundedBuffer {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for BoundedBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + bytes.len() > self.limit {
            return Err(std::io::Error::other(OutputLimitExceeded(self.limit)));
        }
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    limits: RenderLimits,
    pub source: Arc<str>,
}

/// Rewrites `{% generation %}...{% endgeneration %}` (transformers' AssistantTracker tag, which
/// minijinja cannot parse) into a filter block; whitespace-control markers are kept.
fn rewrite_generation_tags(source: &str) -> String {
    use std::sync::OnceLock;
    static OPEN: OnceLock<regex::Regex> = OnceLock::new();
    static CLOSE: OnceLock<regex::Regex> = OnceLock::new();
    let open =
        OPEN.get_or_init(|| regex::Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").unwrap());
    let close = CLOSE
        .get_or_init(|| regex::Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").unwrap());
    let s = open.replace_all(source, "{%${1} filter _chatmask_generation ${2}%}");
    close
        .replace_all(&s, "{%${1} endfilter ${2}%}")
        .into_owned()
}

/// Jinja2 reads template source with universal newlines.
fn normalize_newlines(source: &str) -> String {
    source.replace("\r\n", "\n").replace('\r', "\n")
}

/// Jinja2's `trim_blocks` does not eat the newline right after `{% raw %}`; minijinja's does,
/// so that newline is doubled for minijinja to eat one.
pub(crate) fn keep_newline_after_raw(source: &str) -> String {
    use std::sync::OnceLock;
    static RAW: OnceLock<regex::Regex> = OnceLock::new();
    let raw = RAW.get_or_init(|| regex::Regex::new(r"(\{%[-+]?\s*raw\s*%\})\n").unwrap());
    raw.replace_all(source, "${1}\n\n").into_owned()
}

fn syntax_config() -> minijinja::syntax::SyntaxConfig {
    minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("default delimiters are valid")
}

fn build_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(syntax_config());
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(methods::unknown_method);
    env.set_formatter(|out, _state, value| {
        if let Some(method) = value.downcast_object_ref::<pyvalues::BoundMethod>() {
            return Err(method.printed_error());
        }
        if !value.is_undefined() {
            out.write_str(&pyfmt::py_str(value))
                .map_err(JinjaError::from)?;
        }
        Ok(())
    });
    env.add_filter("tojson", tojson);
    env.add_filter("string", python_string);
    env.add_filter("safe", pyvalues::mark_safe);
    env.add_function("_chatmask_add", pyvalues::add);
    env.add_function("_chatmask_concat", pyvalues::concat);
    env.add_function("_chatmask_attr", |value: Value, name: String| {
        pyvalues::attr(value, &name)
    });
    env.add_filter("trim", trim);
    env.add_filter("join", join);
    env.add_filter("indent", indent);
    env.add_filter(
        "map",
        |state: &mut State, value: Value, args: Rest<ValueOrKwargs>| {
            minijinja::filters::map(state, value, args).map(generator)
        },
    );
    env.add_filter(
        "select",
        |state: &mut State, value: Value, test: Option<Cow<'_, str>>, args: Rest<ValueOrKwargs>| {
            minijinja::filters::select(state, value, test, args).map(generator)
        },
    );
    env.add_filter(
        "reject",
        |state: &mut State, value: Value, test: Option<Cow<'_, str>>, args: Rest<ValueOrKwargs>| {
            minijinja::filters::reject(state, value, test, args).map(generator)
        },
    );
    env.add_filter(
        "selectattr",
        |state: &mut State,
         value: Value,
         attr: Cow<'_, str>,
         test: Option<Cow<'_, str>>,
         args: Rest<ValueOrKwargs>| {
            minijinja::filters::selectattr(state, value, attr, test, args).map(generator)
        },
    );
    env.add_filter(
        "rejectattr",
        |state: &mut State,
         value: Value,
         attr: Cow<'_, str>,
         test: Option<Cow<'_, str>>,
         args: Rest<ValueOrKwargs>| {
            minijinja::filters::rejectattr(state, value, attr, test, args).map(generator)
        },
    );
    env.add_test("sequence", is_sequence);
    env.add_filter("title", |v: Value| methods::title_filter(&v));
    // Jinja2's `upper`, `lower` and `capitalize` filters call the str methods (Markup stays Markup).
    env.add_filter("upper", |v: Value| {
        pyvalues::like(&v, pycase::py_upper(&pyfmt::py_str(&v)))
    });
    env.add_filter("lower", |v: Value| {
        pyvalues::like(&v, pycase::py_lower(&pyfmt::py_str(&v)))
    });
    env.add_filter("capitalize", |v: Value| {
        pyvalues::like(&v, pycase::py_capitalize(&pyfmt::py_str(&v)))
    });
    env.add_filter("wordcount", |v: Value| methods::wordcount(&v));
    env.add_filter("_chatmask_generation", generation_block);
    env.add_filter("_chatmask_iterable", iterable_or_raise);
    env.add_filter("_chatmask_sized", |state: &State, value: Value| {
        if let Some(s) = value.as_str() {
            check_value_size(state, s.len())?;
        }
        Ok::<_, JinjaError>(value)
    });
    env.add_function(
        "_chatmask_percent",
        |state: &State, a: Value, b: Value, kind: i64| {
            printf::percent(state, &a, &b, printf::RhsKind::from_code(kind))
        },
    );
    env.add_test("iterable", is_iterable);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    // Lets the test suite check that a panic anywhere in a render reaches Python as a
    // ChatMaskError, from the calling thread and from batch workers. Harmless to a template:
    // the panic is caught like any other.
    env.add_function(
        "_chatmask_panic_for_tests",
        |message: String| -> Result<Value, JinjaError> { panic!("{message}") },
    );
    env
}

/// Maps a minijinja error to ours, keeping `raise_exception` messages and line numbers.
pub fn render_error(err: &JinjaError) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<TemplateRaised>() {
            return Error::TemplateRaised(raised.0.clone());
        }
        source = e.source();
    }
    let detail = err
        .detail()
        .map(str::to_string)
        .unwrap_or_else(|| err.kind().to_string());
    if let Some(limit) = exceeded_limit(err, &detail) {
        return Error::TemplateLimit {
            limit,
            line: err.line(),
        };
    }
    Error::TemplateRender {
        detail,
        line: err.line(),
    }
}

/// The limit a render error reports having hit, if any.
fn exceeded_limit(err: &JinjaError, detail: &str) -> Option<String> {
    if err.kind() == ErrorKind::OutOfFuel {
        return Some("it ran out of fuel (its instruction budget)".into());
    }
    if detail == "recursion limit exceeded" {
        return Some("it exceeded the recursion limit".into());
    }
    // The io::Error minijinja keeps as the source hides our payload behind `get_ref`.
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        let payload = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|p| p as &(dyn std::error::Error + 'static));
        if let Some(out) = payload.unwrap_or(e).downcast_ref::<OutputLimitExceeded>() {
            return Some(format!("its {out}"));
        }
        source = e.source();
    }
    None
}

/// The most fuel any render in this process has used: how far real templates are from the
/// limit (the test suite reads it after rendering the fixture corpus).
static PEAK_FUEL_USED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The peak so far; with `reset`, starts a new measurement.
pub fn peak_fuel_used(reset: bool) -> u64 {
    if reset {
        PEAK_FUEL_USED.swap(0, std::sync::atomic::Ordering::Relaxed)
    } else {
        PEAK_FUEL_USED.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl ChatTemplate {
    /// Compiles a template source as transformers would see it.
    pub fn compile(source: &str, limits: RenderLimits) -> Result<ChatTemplate, Error> {
        let mut env = build_environment();
        env.set_fuel(limits.fuel);
        env.set_recursion_limit(limits.max_recursion);
        if let Some(limit) = limits.max_output_bytes {
            env.add_global(VALUE_LIMIT_VAR, Value::from(limit));
        }
        let prepared =
            keep_newline_after_raw(&rewrite_generation_tags(&normalize_newlines(source)));
        let prepared =
            rewrite::guard_none_iteration(&rewrite::python_operators(&prepared, syntax_config()));
        env.add_template_owned(TEMPLATE_NAME, prepared)
            .map_err(|e| Error::TemplateSyntax {
                detail: e
                    .detail()
                    .map(str::to_string)
                    .unwrap_or_else(|| e.kind().to_string()),
                line: e.line(),
            })?;
        Ok(ChatTemplate {
            env,
            limits,
            source: Arc::from(source),
        })
    }

    /// Whether the template has `{% generation %}` blocks.
    pub fn has_generation_blocks(&self) -> bool {
        regex::Regex::new(r"\{%-?\s*generation\s*-?%\}").is_ok_and(|re| re.is_match(&self.source))
    }

    /// Renders with a full context (messages, tools, add_generation_prompt, special tokens, ...).
    pub fn render(&self, ctx: &Value) -> Result<String, Error> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| render_error(&e))?;
        let limit = self.limits.max_output_bytes.unwrap_or(usize::MAX);
        let mut out = BoundedBuffer {
            buf: Vec::new(),
            limit,
        };
        let done = tmpl
            .render_captured_to(ctx, &mut out)
            .map_err(|e| render_error(&e))?;
        if let Some((used, _)) = done.state().fuel_levels() {
            PEAK_FUEL_USED.fetch_max(used, std::sync::atomic::Ordering::Relaxed);
        }
        drop(done);
        // minijinja writes only `str` slices, so the bytes are UTF-8.
        String::from_utf8(out.buf)
            .map_err(|e| Error::Internal(format!("render produced invalid UTF-8: {e}")))
    }
}

/// Builds the render context the way transformers' `render_jinja_template` calls `render`:
/// the named special tokens, then the caller's keyword arguments, then the fixed names.
pub fn render_context(
    messages: Value,
    add_generation_prompt: bool,
    base: &[(String, Value)],
) -> Value {
    let mut pairs: Vec<(Value, Value)> = Vec::with_capacity(base.len() + 4);
    pairs.push((Value::from("messages"), messages));
    pairs.push((
        Value::from("add_generation_prompt"),
        Value::from(add_generation_prompt),
    ));
    for (k, v) in base {
        if k != "messages" && k != "add_generation_prompt" {
            pairs.push((Value::from(k.as_str()), v.clone()));
        }
    }
    Value::from_pairs(pairs)
}

/// Whether a value is a non-map, non-sequence (a check the loaders use for message shape).
pub fn is_map(v: &Value) -> bool {
    v.kind() == ValueKind::Map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: Value, base: &[(String, Value)]) -> Result<String, Error> {
        ChatTemplate::compile(src, RenderLimits::default())?
            .render(&render_context(messages, false, base))
    }

    fn msgs(pairs: &[(&str, &str)]) -> Value {
        Value::from(
            pairs
                .iter()
                .map(|(r, c)| {
                    Value::from_pairs(vec![
                        ("role", Value::from(*r)),
                        ("content", Value::from(*c)),
                    ])
                })
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn python_printing_and_whitespace_control() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n{{ m.content|trim }}|{{ none }}|{{ [1, 'a'] }}\n  {% endif %}\n{% endfor %}";
        let out = render(src, msgs(&[("user", " hi\u{1c} ")]), &[]).unwrap();
        assert_eq!(out, "hi|None|[1, 'a']\n");
    }

    #[test]
    fn raise_exception_message_passes_through() {
        let err = render(
            "{{ raise_exception('roles must alternate') }}",
            msgs(&[]),
            &[],
        )
        .unwrap_err();
        assert!(
            matches!(err, Error::TemplateRaised(ref m) if m == "roles must alternate"),
            "{err:?}"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let out = render("{%- generation -%}A{%- endgeneration %}B", msgs(&[]), &[]).unwrap();
        assert_eq!(out, "AB");
    }

    #[test]
    fn jinja2_quirks_raw_indent_sequence() {
        let out = render("A{% raw %}\nB{% endraw %}C|{{ 'x\n'|indent(4, first=true) }}|{{ 'a\nb\n'|indent(2) }}|{{ 'abc' is sequence }}", msgs(&[]), &[]).unwrap();
        assert_eq!(out, "A\nBC|    x\n|a\n  b\n|True");
    }

    #[test]
    fn markup_and_bound_methods_render_like_jinja2() {
        let out = render(
            "{{ ('<a>'|safe) + '<b>' }}|{{ '&' + ('<'|safe) }}|{{ (('<'|safe) ~ '>') + '&' }}|{{ none|safe }}\
             |{% if messages[0].items %}{{ messages[0].items is defined }}{{ messages[0].pop is defined }}\
             {{ messages[0].items is iterable }}{{ messages[0].items.role is defined }}{{ messages[0].items() | list | length }}{% endif %}\
             {% set ns = namespace(items=3) %}{{ ns.items }}",
            msgs(&[("user", "x")]),
            &[],
        )
        .unwrap();
        assert_eq!(out, "<a>&lt;b&gt;|&amp;<|<>&|None|TrueFalseFalseFalse23");
        // `{% set %}` values are wrapped for the size check; a tuple without parentheses whole.
        let out = render(
            "{% set a, b, c = 1, 'x', none %}{{ a }}{{ b }}{{ c }}{% set t = 1, 2 %}{{ t }}",
            msgs(&[]),
            &[],
        )
        .unwrap();
        assert_eq!(out, "1xNone(1, 2)");
        let err = render("{{ messages[0].items }}", msgs(&[("user", "x")]), &[]).unwrap_err();
        assert!(err.to_string().contains("memory address"), "{err}");
    }

    #[test]
    fn iterating_none_raises_like_jinja2() {
        let tools = [("tools".to_string(), Value::from(()))];
        let err = render("{% for t in tools %}{{ t }}{% endfor %}", msgs(&[]), &tools).unwrap_err();
        assert!(
            format!("{err}").contains("'NoneType' object is not iterable"),
            "{err}"
        );
        // Undefined still iterates as empty; filters, slices and `if` clauses keep working.
        let out = render(
            "{% for m in nothing %}x{% endfor %}{% for m in messages[1:]|reverse if m.role %}{{ m.role }}{% endfor %}\
             {% macro f(xs) %}{% for x in xs %}{{ x }}{% endfor %}{% endmacro %}{{ f([1, 2]) }}",
            msgs(&[("system", "a"), ("assistant", "b"), ("user", "c")]),
            &[],
        )
        .unwrap();
        assert_eq!(out, "userassistant12");
    }

    fn render_limited(src: &str, limits: RenderLimits) -> Result<String, Error> {
        ChatTemplate::compile(src, limits)?.render(&render_context(msgs(&[]), false, &[]))
    }

    #[test]
    fn runaway_templates_stop_at_a_limit() {
        let cases = [
            ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "fuel"),
            ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
            ("{% for i in range(100000) %}{{ 'x' * 100000000 }}{% endfor %}", "output exceeds"),
            ("{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "fuel"),
            ("{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "fuel"),
        ];
        for (src, limit) in cases {
            let err = render_limited(src, RenderLimits::default()).unwrap_err();
            assert!(matches!(err, Error::TemplateLimit { .. }), "{src}: {err:?}");
            assert!(err.to_string().contains(limit), "{src}: {err}");
        }
    }

    #[test]
    fn limits_are_configurable() {
        let deep =
            "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}done";
        assert_eq!(
            render_limited(deep, RenderLimits::default()).unwrap(),
            "done"
        );
        let shallow = RenderLimits {
            max_recursion: 20,
            ..RenderLimits::default()
        };
        assert!(matches!(
            render_limited(deep, shallow),
            Err(Error::TemplateLimit { .. })
        ));
        let tiny_output = RenderLimits {
            max_output_bytes: Some(3),
            ..RenderLimits::default()
        };
        assert_eq!(render_limited("abc", tiny_output).unwrap(), "abc");
        assert!(matches!(
            render_limited("abcd", tiny_output),
            Err(Error::TemplateLimit { .. })
        ));
        // A string grown by `{% set %}` stops at the output limit, not at the fuel's ~640 MB.
        let doubling = "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}";
        let err = render_limited(
            doubling,
            RenderLimits {
                max_output_bytes: Some(1 << 20),
                ..RenderLimits::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("output exceeds"), "{err}");
        let loop_1m =
            "{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}ok";
        assert!(matches!(
            render_limited(
                loop_1m,
                RenderLimits {
                    fuel: Some(10_000),
                    ..RenderLimits::default()
                }
            ),
            Err(Error::TemplateLimit { .. })
        ));
        assert_eq!(
            render_limited(
                loop_1m,
                RenderLimits {
                    fuel: None,
                    ..RenderLimits::default()
                }
            )
            .unwrap(),
            "ok"
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let err = ChatTemplate::compile("ok\n{% if %}", RenderLimits::default())
            .err()
            .expect("must fail");
        assert!(
            matches!(err, Error::TemplateSyntax { line: Some(2), .. }),
            "{err:?}"
        );
    }
}
