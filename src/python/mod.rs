//! The `chatmask._core` extension module: conversions between Python and the core, nothing else.
//!
//! Python values become template values the way transformers' `_plain_template_data` builds
//! them; core errors become the `chatmask.errors` hierarchy; heavy work runs with the GIL
//! released.
//!
//! Rooms: `convert` (Python values into core values), `rows` (the core's JSONL rows),
//! `tokenizer` (the `ChatTokenizer` class), `batch_call` (its batch call), `rollout` (its rollout
//! call), `pack` (sequence packing), and here the error mapping, the module-level functions and the module itself.

mod batch_call;
mod convert;
mod label_call;
mod pack;
mod rollout;
mod rows;
mod tokenizer;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyDict;

use crate::batch::{self};
use crate::demo;
use crate::error::{catch_panic, Error};
use crate::template::RenderLimits;

use rows::{parse_jsonl, PyJsonRow};
use tokenizer::PyChatTokenizer;

static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

fn error_class<'py>(py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
    let module = ERRORS.get_or_try_init(py, || py.import("chatmask.errors").map(Bound::unbind))?;
    module.bind(py).getattr(name)
}

/// Converts a core error into the matching `chatmask.errors` exception, naming the row if any.
fn to_pyerr(py: Python<'_>, err: &Error, row: Option<usize>) -> PyErr {
    let class = match err {
        Error::TemplateSyntax { .. } => "TemplateSyntaxError",
        Error::TemplateRender { .. } | Error::TemplateRaised(_) => "TemplateError",
        Error::TemplateLimit { .. } => "TemplateLimitError",
        Error::EmptyConversation
        | Error::MissingRole { .. }
        | Error::Broadcast { .. }
        | Error::EmptyTokens => "ConversationError",
        Error::InvalidInput(_) => "ConversationTypeError",
        Error::Tokenizer(_) | Error::Config(_) => "TokenizerError",
        Error::TooLong(_) => "SequenceTooLongError",
        Error::Span(_) => "SpanError",
        Error::Rollout(_) => "RolloutError",
        Error::Unsanitizable(_) => "ConversationError",
        Error::Internal(_) => "ChatMaskError",
    };
    let message = match row {
        Some(r) => format!("row {r}: {err}"),
        None => err.to_string(),
    };
    match error_class(py, class).and_then(|cls| cls.call1((message.clone(),))) {
        Ok(exc) => {
            if let Some(r) = row {
                let _ = exc.setattr("row", r);
            }
            PyErr::from_value(exc)
        }
        Err(e) => e,
    }
}

fn core_err(py: Python<'_>) -> impl Fn(Error) -> PyErr + '_ {
    move |e| to_pyerr(py, &e, None)
}

/// Runs core work with the GIL released. A panic becomes a `ChatMaskError`: pyo3 would raise
/// `PanicException`, a `BaseException` that `except Exception` does not catch.
fn run<T: Send>(py: Python<'_>, work: impl FnOnce() -> Result<T, Error> + Send) -> PyResult<T> {
    py.detach(|| catch_panic(work)).map_err(core_err(py))
}

/// The thread count a batch uses when `num_threads` is None (`RAYON_NUM_THREADS`, else all cores).
#[pyfunction]
fn default_threads() -> usize {
    batch::resolve_threads(None)
}

/// The most fuel any native render in this process has used since the last reset (see
/// `RenderLimits`); `reset=True` returns it and starts over.
#[pyfunction]
#[pyo3(signature = (reset=false))]
fn peak_render_fuel(reset: bool) -> u64 {
    crate::template::peak_fuel_used(reset)
}

/// The code points the Python layer checks against its `unicodedata` (see `_unicode.py`).
#[pyfunction]
fn unicode_known_text() -> String {
    crate::template::pycase::known_text()
}

/// Installs the running Python's case mappings and unassigned code points (once per process).
#[pyfunction]
fn install_unicode_tables(tables: &Bound<'_, PyDict>) -> PyResult<()> {
    use std::collections::HashMap;
    let item = |name: &str| -> PyResult<Bound<'_, PyAny>> {
        tables
            .get_item(name)?
            .ok_or_else(|| PyValueError::new_err(format!("missing table {name:?}")))
    };
    let mapping = |name: &str| -> PyResult<HashMap<char, String>> {
        let raw: HashMap<String, String> = item(name)?.extract()?;
        raw.into_iter()
            .map(|(k, v)| {
                let mut chars = k.chars();
                match (chars.next(), chars.next()) {
                    (Some(c), None) => Ok((c, v)),
                    _ => Err(PyValueError::new_err(format!(
                        "{name}: key {k:?} is not one character"
                    ))),
                }
            })
            .collect()
    };
    let chars = |name: &str| -> PyResult<std::collections::HashSet<char>> {
        Ok(item(name)?.extract::<String>()?.chars().collect())
    };
    crate::template::pycase::install(crate::template::pycase::Tables {
        upper: mapping("upper")?,
        lower: mapping("lower")?,
        title: mapping("title")?,
        casefold: mapping("casefold")?,
        unassigned: chars("unassigned")?,
        is_lower: chars("is_lower")?,
        is_upper: chars("is_upper")?,
        is_title: chars("is_title")?,
        version: item("version")?.extract()?,
    });
    Ok(())
}

/// The demo tokenizer's `tokenizer.json` ("bytelevel" or "metaspace"), trained on the demo data.
#[pyfunction]
#[pyo3(signature = (kind="bytelevel"))]
fn demo_tokenizer_json(py: Python<'_>, kind: &str) -> PyResult<String> {
    let kind = match kind {
        "bytelevel" => demo::DemoKind::ByteLevel,
        "metaspace" => demo::DemoKind::Metaspace,
        other => {
            return Err(PyValueError::new_err(format!(
                "kind must be 'bytelevel' or 'metaspace', not {other:?}"
            )))
        }
    };
    run(py, || demo::tokenizer_json(kind))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyChatTokenizer>()?;
    m.add_class::<PyJsonRow>()?;
    m.add_function(wrap_pyfunction!(parse_jsonl, m)?)?;
    batch::install_fork_handler();
    m.add_function(wrap_pyfunction!(demo_tokenizer_json, m)?)?;
    m.add_function(wrap_pyfunction!(default_threads, m)?)?;
    m.add_function(wrap_pyfunction!(peak_render_fuel, m)?)?;
    m.add_function(wrap_pyfunction!(unicode_known_text, m)?)?;
    m.add_function(wrap_pyfunction!(install_unicode_tables, m)?)?;
    pack::register(m)?;
    m.add("DEMO_CONVERSATIONS_JSON", demo::CONVERSATIONS_JSON)?;
    m.add("DEMO_CHAT_TEMPLATE", demo::CHAT_TEMPLATE)?;
    m.add("DEMO_EOS_TOKEN", demo::EOS_TOKEN)?;
    let limits = RenderLimits::default();
    m.add(
        "DEFAULT_RENDER_LIMITS",
        (limits.fuel, limits.max_recursion, limits.max_output_bytes),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
