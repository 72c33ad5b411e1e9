//! The `chatmask._core` extension module: conversions between Python and the core, nothing else.
//!
//! Python values become template values the way transformers' `_plain_template_data` builds
//! them; core errors become the `chatmask.errors` hierarchy; heavy work runs with the GIL
//! released.

use std::path::PathBuf;
use std::sync::Arc;

use minijinja::value::Value;
use numpy::IntoPyArray;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use crate::batch::{self, OnError};
use crate::chat::Conversation;
use crate::core::{ChatTokenizer, TemplateArgs, TemplateSources};
use crate::demo;
use crate::encode::{CharSpans, EncoderChoice};
use crate::error::{catch_panic, Error};
use crate::label::Mode;
use crate::policy::{EndTokens, Overflow, Policy, SpanSource};
use crate::rows::{self, JsonRow, RowFields, Shape};
use crate::spans::FieldKind;
use crate::template::RenderLimits;

/// One field's place in a render, as `message_spans` returns it: `(message, kind, start, end)`.
type SpanRow = (usize, &'static str, usize, usize);

/// Deeper nesting than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 256;

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

/// A Python value as plain template data (transformers' `_plain_template_data`).
fn to_value(obj: &Bound<'_, PyAny>, depth: usize) -> Result<Value, Error> {
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
fn to_conversation(chat: &Bound<'_, PyAny>) -> Result<Conversation, Error> {
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

/// A JSONL row the core read (`parse_jsonl`): nothing to convert. Under a policy it is shaped
/// here, as `MaskPolicy.shape` shapes a Python row.
#[pyclass(name = "JsonRow", module = "chatmask._core", frozen)]
pub struct PyJsonRow {
    row: JsonRow,
}

#[pymethods]
impl PyJsonRow {
    #[getter]
    fn id(&self) -> Option<&str> {
        self.row.id.as_deref()
    }
    #[getter]
    fn finish_reason(&self) -> Option<&str> {
        self.row.finish_reason.as_deref()
    }
    /// Per message: whether its role is one the reference trains.
    fn assistant_messages(&self) -> Vec<bool> {
        self.row.assistant_messages()
    }
    /// The row's values as JSON text `[messages, tools, system]` (the messages shaped by
    /// `shape`, a `MaskPolicy.shape_spec()`, when given), for differential tests.
    #[pyo3(signature = (shape=None))]
    fn values_json(&self, shape: Option<&Bound<'_, PyDict>>) -> PyResult<Option<String>> {
        let row = &self.row;
        let messages = match shape.map(to_shape).transpose()? {
            None => Some(row.messages.clone()),
            Some(shape) => shape.apply(row),
        };
        messages
            .map(|m| serde_json::to_string(&(&m, &row.tools, &row.system)))
            .transpose()
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

impl PyJsonRow {
    fn to_row(&self, shape: Option<&Shape>) -> batch::Row {
        let messages = match shape {
            None => self.row.messages.clone(),
            Some(shape) => shape
                .apply(&self.row)
                .ok_or_else(|| Error::InvalidInput("a message is not a dict".into()))?,
        };
        let overrides = self
            .row
            .tools
            .iter()
            .map(|t| ("tools".to_string(), t.clone()));
        Ok(batch::RowInput {
            conversation: Conversation::new(messages)?,
            overrides: overrides.collect(),
            finish_length: false,
        })
    }
}

/// JSONL lines read by the core, in parallel with the GIL released: per line a `JsonRow`, or
/// None where `chatmask.rows` must read the line (it then gives the exact value or reason).
#[pyfunction]
#[pyo3(signature = (lines, messages_field, tools_field, finish_reason_field=None, system_field=None, policy=false))]
fn parse_jsonl<'py>(
    py: Python<'py>,
    lines: Vec<Bound<'py, PyBytes>>,
    messages_field: String,
    tools_field: String,
    finish_reason_field: Option<String>,
    system_field: Option<String>,
    policy: bool,
) -> PyResult<Vec<Option<Py<PyJsonRow>>>> {
    use rayon::prelude::*;
    let fields = RowFields {
        messages: messages_field,
        tools: tools_field,
        finish_reason: finish_reason_field,
        system: system_field,
        policy,
    };
    let slices: Vec<&[u8]> = lines.iter().map(|b| b.as_bytes()).collect();
    let parsed: Vec<Option<JsonRow>> = py.detach(|| {
        slices
            .par_iter()
            .with_min_len(64)
            .map(|line| rows::parse_line(line, &fields))
            .collect()
    });
    parsed
        .into_iter()
        .map(|row| row.map(|row| Py::new(py, PyJsonRow { row })).transpose())
        .collect()
}

/// `MaskPolicy.shape_spec()`: role lookup, property mappings, drop_system_message.
fn to_shape(d: &Bound<'_, PyDict>) -> PyResult<Shape> {
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
fn to_row(row: &Bound<'_, PyAny>, shape: Option<&Shape>) -> batch::Row {
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

fn kwargs_to_values(kwargs: Option<&Bound<'_, PyDict>>) -> Result<Vec<(String, Value)>, Error> {
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

fn ids_list<'py>(py: Python<'py>, ids: &[u32]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, ids)
}

/// The compiled core: a tokenizer with its chat templates.
#[pyclass(name = "ChatTokenizer", module = "chatmask._core", frozen)]
pub struct PyChatTokenizer {
    inner: Arc<ChatTokenizer>,
}

impl PyChatTokenizer {
    fn args(
        &self,
        py: Python<'_>,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TemplateArgs> {
        let values = kwargs_to_values(kwargs).map_err(core_err(py))?;
        self.inner
            .template_args(chat_template, values)
            .map_err(core_err(py))
    }

    /// A call's conversation and template arguments, converted with the GIL held.
    fn prepare(
        &self,
        py: Python<'_>,
        conversation: &Bound<'_, PyAny>,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<(Conversation, TemplateArgs)> {
        let conv = to_conversation(conversation).map_err(core_err(py))?;
        Ok((conv, self.args(py, chat_template, kwargs)?))
    }
}

impl PyChatTokenizer {
    /// A `Policy` from the dict `MaskPolicy.to_core()` builds. `MaskPolicy` declares the keys,
    /// their defaults and their checks; this only converts types, so every key must be there (a
    /// missing or unknown one is a bug in `to_core()`, never filled in with a default here).
    fn policy<'py>(&self, d: &Bound<'py, PyDict>) -> PyResult<Policy> {
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
                            let ids = self.inner.encoder.encode(t).map_err(bad)?;
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
}

fn encoder_choice(name: &str) -> PyResult<EncoderChoice> {
    EncoderChoice::parse(name).ok_or_else(|| {
        PyValueError::new_err(format!(
            "encoder must be 'auto', 'fast' or 'tokenizers', not {name:?}"
        ))
    })
}

#[pymethods]
impl PyChatTokenizer {
    /// Loads a local tokenizer directory (tokenizer.json, tokenizer_config.json, chat_template.jinja).
    #[staticmethod]
    #[pyo3(signature = (path, encoder="auto"))]
    fn from_pretrained(py: Python<'_>, path: PathBuf, encoder: &str) -> PyResult<Self> {
        let encoder = encoder_choice(encoder)?;
        let inner = run(py, || ChatTokenizer::from_dir(&path, encoder))?;
        Ok(PyChatTokenizer {
            inner: Arc::new(inner),
        })
    }

    /// Builds the core from a serialized tokenizer, a template (a string, or a dict of named
    /// templates) and the named special tokens.
    #[staticmethod]
    #[pyo3(signature = (tokenizer_json, chat_template=None, special_tokens=None, encoder="auto"))]
    fn from_parts(
        py: Python<'_>,
        tokenizer_json: String,
        chat_template: Option<&Bound<'_, PyAny>>,
        special_tokens: Option<&Bound<'_, PyDict>>,
        encoder: &str,
    ) -> PyResult<Self> {
        let encoder = encoder_choice(encoder)?;
        let mut sources = TemplateSources::default();
        if let Some(t) = chat_template {
            if let Ok(s) = t.extract::<String>() {
                sources.default = Some(s);
            } else if let Ok(d) = t.cast::<PyDict>() {
                for (k, v) in d.iter() {
                    sources.named.push((k.extract()?, v.extract()?));
                }
            } else if !t.is_none() {
                return Err(PyTypeError::new_err(
                    "chat_template must be a str or a dict of named templates",
                ));
            }
        }
        let mut specials = Vec::new();
        if let Some(d) = special_tokens {
            for (k, v) in d.iter() {
                specials.push((k.extract::<String>()?, v.str()?.to_string()));
            }
        }
        let inner = run(py, || {
            ChatTokenizer::new(&tokenizer_json, sources, specials, encoder)
        })?;
        Ok(PyChatTokenizer {
            inner: Arc::new(inner),
        })
    }

    /// `"fast"` or `"tokenizers"`: the engine that encodes for this tokenizer.
    #[getter]
    fn encoder_backend(&self) -> &'static str {
        self.inner.encoder.backend()
    }

    /// Why the `tokenizers` crate encodes (None when the fast engine does), and whether that
    /// is because the self-check found a difference.
    #[getter]
    fn encoder_fallback(&self) -> Option<(String, bool)> {
        use crate::encode::Fallback;
        self.inner
            .encoder
            .fallback()
            .map(|f| (f.describe(), matches!(f, Fallback::Differs(_))))
    }

    /// Seconds the engine gate took when this tokenizer was first loaded in the process:
    /// `(building the fast engine, the probe self-check)`.
    #[getter]
    fn encoder_check_seconds(&self) -> (f64, f64) {
        let t = self.inner.encoder.gate_timing();
        (t.build, t.probes)
    }

    /// Token ids from the `tokenizers` crate, whatever the engine (for differential tests).
    fn reference_encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        run(py, || self.inner.encoder.reference_encode(text))
    }

    #[getter]
    fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos_token_id
    }

    #[getter]
    fn special_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (k, v) in self.inner.special_tokens() {
            d.set_item(k, v)?;
        }
        Ok(d)
    }

    #[getter]
    fn has_chat_template(&self) -> bool {
        self.inner.has_template()
    }

    /// Token ids of `text` (no special tokens added).
    fn encode<'py>(&self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyList>> {
        let ids = run(py, || self.inner.encoder.encode(text))?;
        ids_list(py, &ids)
    }

    /// Decodes ids to text; with `per_token`, one string per id.
    #[pyo3(signature = (ids, per_token=false))]
    fn decode<'py>(
        &self,
        py: Python<'py>,
        ids: Vec<u32>,
        per_token: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let tok = self.inner.encoder.tokenizer();
        let decode = |chunk: &[u32]| {
            tok.decode(chunk, false)
                .map_err(|e| Error::Tokenizer(e.to_string()))
        };
        if per_token {
            let pieces = ids
                .iter()
                .map(|id| decode(std::slice::from_ref(id)))
                .collect::<Result<Vec<_>, _>>();
            Ok(PyList::new(py, pieces.map_err(core_err(py))?)?.into_any())
        } else {
            Ok(PyString::new(py, &decode(&ids).map_err(core_err(py))?).into_any())
        }
    }

    /// The template source that would be used.
    #[pyo3(signature = (chat_template=None, has_tools=false))]
    fn template_source(
        &self,
        py: Python<'_>,
        chat_template: Option<&str>,
        has_tools: bool,
    ) -> PyResult<String> {
        self.inner
            .template_source(chat_template, has_tools)
            .map_err(core_err(py))
    }

    /// Renders a conversation to text.
    #[pyo3(signature = (conversation, add_generation_prompt=false, chat_template=None, **kwargs))]
    fn render(
        &self,
        py: Python<'_>,
        conversation: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let (conv, args) = self.prepare(py, conversation, chat_template, kwargs)?;
        let inner = &self.inner;
        run(py, || {
            inner.render(&conv, conv.len(), add_generation_prompt, &args)
        })
    }

    /// Token ids and transformers' `assistant_masks` from `{% generation %}` blocks.
    #[pyo3(signature = (conversation, add_generation_prompt=false, chat_template=None, **kwargs))]
    fn assistant_mask<'py>(
        &self,
        py: Python<'py>,
        conversation: &Bound<'py, PyAny>,
        add_generation_prompt: bool,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let (conv, args) = self.prepare(py, conversation, chat_template, kwargs)?;
        let inner = &self.inner;
        let (ids, mask) = run(py, || {
            inner.assistant_mask(&conv, add_generation_prompt, &args)
        })?;
        Ok((ids_list(py, &ids)?, PyList::new(py, &mask)?))
    }

    /// Renders and returns `(text, spans)`: the `{% generation %}` spans in code points.
    #[pyo3(signature = (conversation, add_generation_prompt=false, chat_template=None, **kwargs))]
    fn render_with_spans(
        &self,
        py: Python<'_>,
        conversation: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<(String, Vec<(usize, usize)>)> {
        let (conv, args) = self.prepare(py, conversation, chat_template, kwargs)?;
        let inner = &self.inner;
        run(py, || {
            inner.render_with_spans(&conv, conv.len(), add_generation_prompt, &args)
        })
    }

    /// Why minijinja cannot compile a template (None if it can): the caller's cue to fall back.
    #[pyo3(signature = (chat_template=None, has_tools=false))]
    fn compile_error(
        &self,
        py: Python<'_>,
        chat_template: Option<&str>,
        has_tools: bool,
    ) -> PyResult<Option<PyErr>> {
        let source = self
            .inner
            .template_source(chat_template, has_tools)
            .map_err(core_err(py))?;
        Ok(self
            .inner
            .compile_error(&source)
            .map(|e| to_pyerr(py, &e, None)))
    }

    /// Every template source the tokenizer carries (default and named).
    fn template_sources(&self) -> Vec<String> {
        self.inner.template_sources()
    }

    /// `(fuel, max_recursion, max_output_bytes)` every native render runs under.
    fn render_limits(&self) -> (Option<u64>, usize, Option<usize>) {
        let l = self.inner.render_limits();
        (l.fuel, l.max_recursion, l.max_output_bytes)
    }

    fn set_render_limits(
        &self,
        fuel: Option<u64>,
        max_recursion: usize,
        max_output_bytes: Option<usize>,
    ) {
        self.inner.set_render_limits(RenderLimits {
            fuel,
            max_recursion,
            max_output_bytes,
        });
    }

    /// Token ids of `text` and the assistant mask of `spans` (code points), for spans rendered elsewhere.
    fn mask_from_spans<'py>(
        &self,
        py: Python<'py>,
        text: &str,
        spans: Vec<(usize, usize)>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let (ids, mask) = run(py, || self.inner.mask_from_spans(text, &spans))?;
        Ok((ids_list(py, &ids)?, PyList::new(py, &mask)?))
    }

    /// Labels one conversation with renders from a Python callable `render(n, add_generation_prompt)`
    /// (the Jinja2 fallback); encoding and labelling stay here. A render that raises is a
    /// TemplateError carrying its message.
    #[pyo3(signature = (conversation, render, mode="last", finish_reason=""))]
    fn label_with<'py>(
        &self,
        py: Python<'py>,
        conversation: &Bound<'py, PyAny>,
        render: &Bound<'py, PyAny>,
        mode: &str,
        finish_reason: &str,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let mode = Mode::parse(mode).map_err(|e| PyValueError::new_err(e.to_string()))?;
        if mode == Mode::Generation {
            return Err(PyValueError::new_err(
                "mode='generation' with a Python renderer goes through mask_from_spans",
            ));
        }
        let conv = to_conversation(conversation).map_err(core_err(py))?;
        // The renderer's own exception (a TemplateLimitError, say) is re-raised as it was.
        let raised: std::cell::RefCell<Option<PyErr>> = std::cell::RefCell::new(None);
        let call = |n: usize, gen: bool| -> Result<String, Error> {
            render
                .call1((n, gen))
                .and_then(|v| v.extract::<String>())
                .map_err(|e| {
                    let message = e.value(py).to_string();
                    raised.borrow_mut().get_or_insert(e);
                    Error::TemplateRaised(message)
                })
        };
        let out = catch_panic(|| {
            self.inner
                .label_with(&conv.roles, &call, mode, finish_reason == "length")
        })
        .map_err(|e| {
            raised
                .borrow_mut()
                .take()
                .unwrap_or_else(|| core_err(py)(e))
        })?;
        Ok((ids_list(py, &out.tokens)?, PyList::new(py, &out.masks)?))
    }

    /// One conversation labelled as the reference would: `(tokens, masks)` as lists of int.
    #[pyo3(signature = (conversation, mode="last", finish_reason="", chat_template=None, **kwargs))]
    fn label<'py>(
        &self,
        py: Python<'py>,
        conversation: &Bound<'py, PyAny>,
        mode: &str,
        finish_reason: &str,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<(Bound<'py, PyList>, Bound<'py, PyList>)> {
        let mode = Mode::parse(mode).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let (conv, args) = self.prepare(py, conversation, chat_template, kwargs)?;
        let finish_length = finish_reason == "length";
        let inner = &self.inner;
        let out = run(py, || inner.label(&conv, mode, finish_length, &args))?;
        Ok((ids_list(py, &out.tokens)?, PyList::new(py, &out.masks)?))
    }

    /// The policy as the core reads a `MaskPolicy.to_core()` dict, in the same shape (eot
    /// tokens as ids): lets a test check that every option arrives unchanged.
    fn policy_view<'py>(
        &self,
        py: Python<'py>,
        policy: &Bound<'py, PyDict>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let p = self.policy(policy)?;
        let d = PyDict::new(py);
        d.set_item("roles_to_train", &p.roles_to_train)?;
        d.set_item("train_on_inputs", p.train_on_inputs)?;
        d.set_item("train_on_eot", p.train_on_eot.name())?;
        d.set_item("train_on_eos", p.train_on_eos.name())?;
        d.set_item("eot_tokens", &p.eot_tokens)?;
        d.set_item("train_reasoning", p.train_reasoning)?;
        d.set_item("train_turn_prefix", p.train_turn_prefix)?;
        d.set_item("field_training", &p.field_training)?;
        d.set_item("field_training_detail", &p.field_training_detail)?;
        d.set_item("max_length", p.max_length)?;
        d.set_item("overflow", p.overflow.name())?;
        d.set_item("source", p.source.name())?;
        d.set_item("sanitize_control_tokens", p.sanitize_control_tokens)?;
        Ok(d)
    }

    /// One conversation under a policy (a dict of `MaskPolicy` fields): a dict of numpy
    /// arrays `input_ids`, `labels`, `message_index`, plus `span_method`, `straddling`,
    /// `positions_derived`, `truncated`; `None` when `overflow="drop"` drops it.
    #[pyo3(signature = (conversation, policy, add_generation_prompt=false, chat_template=None, **kwargs))]
    fn tokenize<'py>(
        &self,
        py: Python<'py>,
        conversation: &Bound<'py, PyAny>,
        policy: &Bound<'py, PyDict>,
        add_generation_prompt: bool,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let policy = self.policy(policy)?;
        let (conv, args) = self.prepare(py, conversation, chat_template, kwargs)?;
        let inner = &self.inner;
        let Some((out, method)) = run(py, || {
            inner.tokenize(&conv, &policy, add_generation_prompt, &args)
        })?
        else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        d.set_item(
            "input_ids",
            out.input_ids
                .iter()
                .map(|&x| x as i64)
                .collect::<Vec<_>>()
                .into_pyarray(py),
        )?;
        d.set_item("labels", out.labels.into_pyarray(py))?;
        d.set_item("message_index", out.message_index.into_pyarray(py))?;
        d.set_item("span_method", method.name())?;
        d.set_item("straddling", out.straddling)?;
        d.set_item("positions_derived", out.positions_derived)?;
        d.set_item("truncated", out.truncated)?;
        d.set_item("control_tokens_in_input", out.control_found)?;
        Ok(Some(d))
    }

    /// `apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)`: token ids.
    #[pyo3(signature = (conversation, add_generation_prompt=false, chat_template=None, **kwargs))]
    fn encode_sanitized<'py>(
        &self,
        py: Python<'py>,
        conversation: &Bound<'py, PyAny>,
        add_generation_prompt: bool,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyList>> {
        let (conv, args) = self.prepare(py, conversation, chat_template, kwargs)?;
        let inner = &self.inner;
        let ids = run(py, || {
            inner.encode_sanitized(&conv, add_generation_prompt, &args)
        })?;
        ids_list(py, &ids)
    }

    /// The control tokens `sanitize_control_tokens` encodes as text, for a template.
    #[pyo3(signature = (chat_template=None, has_tools=false))]
    fn control_tokens(
        &self,
        py: Python<'_>,
        chat_template: Option<&str>,
        has_tools: bool,
    ) -> PyResult<Vec<String>> {
        let kwargs = if has_tools {
            vec![("tools".to_string(), Value::from(vec![Value::from(())]))]
        } else {
            Vec::new()
        };
        let args = self
            .inner
            .template_args(chat_template, kwargs)
            .map_err(core_err(py))?;
        let found = self.inner.control_tokens(&args).map_err(core_err(py))?;
        Ok(found.tokens().to_vec())
    }

    /// The plain render and where each message's fields landed: `(text, [(message, kind,
    /// start, end)], method)`, kind one of "content", "reasoning", "tool", positions in code points.
    #[pyo3(signature = (conversation, add_generation_prompt=false, chat_template=None, **kwargs))]
    fn message_spans(
        &self,
        py: Python<'_>,
        conversation: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<(String, Vec<SpanRow>, &'static str)> {
        let (conv, args) = self.prepare(py, conversation, chat_template, kwargs)?;
        let inner = &self.inner;
        let located = run(py, || {
            inner.message_spans(&conv, add_generation_prompt, &args)
        })?;
        let spans = located
            .spans
            .iter()
            .map(|s| {
                let kind = match s.kind {
                    FieldKind::Content => "content",
                    FieldKind::Reasoning => "reasoning",
                    FieldKind::Tool => "tool",
                };
                (s.message, kind, s.start, s.end)
            })
            .collect();
        Ok((located.text, spans, located.method.name()))
    }

    /// Token ids of `text` and each token's (start, end) in code points, derived from the
    /// tokens themselves, and whether that worked (else the tokenizer's offsets).
    fn positions<'py>(
        &self,
        py: Python<'py>,
        text: &str,
    ) -> PyResult<(Vec<u32>, CharSpans, bool, CharSpans)> {
        let inner = &self.inner;
        run(py, || {
            let (ids, positions, derived) = inner.encoder.encode_with_positions(text)?;
            let (_, offsets) = inner.encoder.encode_with_char_offsets(text)?;
            Ok((ids, positions, derived, offsets))
        })
    }

    /// Labels many conversations in parallel with the GIL released. Returns a dict of flat
    /// numpy arrays and the list of `(row, message)` errors.
    #[pyo3(signature = (conversations, mode="last", finish_reason=None, num_threads=None, on_error="raise", ids_dtype="int32", chat_template=None, policy=None, shape=None, **kwargs))]
    #[allow(clippy::too_many_arguments)]
    fn tokenize_batch<'py>(
        &self,
        py: Python<'py>,
        conversations: &Bound<'py, PyAny>,
        mode: &str,
        finish_reason: Option<&Bound<'py, PyAny>>,
        num_threads: Option<usize>,
        on_error: &str,
        ids_dtype: &str,
        chat_template: Option<&str>,
        policy: Option<&Bound<'py, PyDict>>,
        shape: Option<&Bound<'py, PyDict>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let shape = shape.map(to_shape).transpose()?;
        let task = match policy {
            Some(p) => batch::Task::Policy(Arc::new(self.policy(p)?)),
            None => batch::Task::Reference(
                Mode::parse(mode).map_err(|e| PyValueError::new_err(e.to_string()))?,
            ),
        };
        let with_policy = policy.is_some();
        let on_error = match on_error {
            "raise" => OnError::Raise,
            "skip" => OnError::Skip,
            other => {
                return Err(PyValueError::new_err(format!(
                    "on_error must be 'raise' or 'skip', not {other:?}"
                )))
            }
        };
        if !matches!(ids_dtype, "int32" | "int64" | "uint32") {
            return Err(PyValueError::new_err(format!(
                "ids_dtype must be int32, int64 or uint32, not {ids_dtype:?}"
            )));
        }
        enum Finish<'a> {
            All(bool),
            PerRow(Bound<'a, PyAny>),
        }
        let finish = match finish_reason {
            None => Finish::All(false),
            Some(f) if f.is_none() => Finish::All(false),
            Some(f) => match f.extract::<String>() {
                Ok(s) => Finish::All(s == "length"),
                Err(_) => Finish::PerRow(f.clone()),
            },
        };
        let finish_of = |i: usize| -> PyResult<bool> {
            match &finish {
                Finish::All(b) => Ok(*b),
                Finish::PerRow(seq) => {
                    let item = seq.get_item(i).map_err(|_| {
                        PyValueError::new_err(format!(
                            "finish_reason has no entry for conversation {i}"
                        ))
                    })?;
                    Ok(item.extract::<Option<String>>()?.as_deref() == Some("length"))
                }
            }
        };
        let values = kwargs_to_values(kwargs).map_err(core_err(py))?;
        let shared = self
            .inner
            .template_args(chat_template, values.clone())
            .map_err(core_err(py))?;
        let args = batch::BatchArgs {
            shared,
            chat_template: chat_template.map(str::to_string),
            kwargs: values,
        };
        let mut runner =
            batch::BatchRunner::new(self.inner.clone(), args, task, on_error, num_threads)
                .map_err(core_err(py))?;
        // Convert a chunk (GIL held) while the pool labels the previous one (GIL not needed).
        let mut rows_in = conversations.try_iter()?;
        let mut pending: Option<batch::Pending> = None;
        let mut n_rows = 0;
        loop {
            let mut chunk = Vec::with_capacity(batch::CHUNK_ROWS);
            for item in rows_in.by_ref().take(batch::CHUNK_ROWS) {
                let finish_length = finish_of(n_rows)?;
                n_rows += 1;
                chunk.push(
                    item.map_err(|e| Error::InvalidInput(e.to_string()))
                        .and_then(|c| to_row(&c, shape.as_ref()))
                        .map(|mut r| {
                            r.finish_length = finish_length;
                            r
                        }),
                );
            }
            let submitted = (!chunk.is_empty()).then(|| py.detach(|| runner.submit(chunk)));
            if let Some(p) = pending.take() {
                let (first, labeled) = py.detach(|| p.wait());
                runner
                    .collect(first, labeled)
                    .map_err(|(row, e)| to_pyerr(py, &e, Some(row)))?;
            }
            match submitted {
                Some(p) => pending = Some(p),
                None => break,
            }
        }
        if let Finish::PerRow(seq) = &finish {
            if seq.len()? != n_rows {
                return Err(PyValueError::new_err(format!(
                    "finish_reason has {} entries for {n_rows} conversations",
                    seq.len()?
                )));
            }
        }
        let out = runner.out;
        let d = PyDict::new(py);
        match ids_dtype {
            // Token ids are below 2^31, so the int32 cast is exact (and done in place).
            "int32" => d.set_item(
                "input_ids",
                out.input_ids
                    .into_iter()
                    .map(|x| x as i32)
                    .collect::<Vec<_>>()
                    .into_pyarray(py),
            )?,
            "int64" => d.set_item(
                "input_ids",
                out.input_ids
                    .iter()
                    .map(|&x| x as i64)
                    .collect::<Vec<_>>()
                    .into_pyarray(py),
            )?,
            _ => d.set_item("input_ids", out.input_ids.into_pyarray(py))?,
        }
        d.set_item("labels", out.labels.into_pyarray(py))?;
        d.set_item("offsets", out.offsets.into_pyarray(py))?;
        d.set_item("label_offsets", out.label_offsets.into_pyarray(py))?;
        d.set_item("rows", out.rows.into_pyarray(py))?;
        d.set_item("control_rows", out.control_rows.into_pyarray(py))?;
        if with_policy {
            d.set_item("message_index", out.message_index.into_pyarray(py))?;
            let methods: Vec<&str> = out.span_methods.iter().map(|m| m.name()).collect();
            d.set_item("span_methods", methods)?;
            d.set_item("straddling", out.straddling.into_pyarray(py))?;
            d.set_item("positions_derived", out.positions_derived.into_pyarray(py))?;
            d.set_item("truncated", out.truncated.into_pyarray(py))?;
            d.set_item("dropped", out.dropped)?;
        }
        let errors = PyList::empty(py);
        for (row, e) in &out.errors {
            errors.append((row, e.to_string()))?;
        }
        d.set_item("errors", errors)?;
        Ok(d)
    }
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
    crate::python_pack::register(m)?;
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
