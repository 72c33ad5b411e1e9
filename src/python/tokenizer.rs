//! The `ChatTokenizer` class: each method converts its arguments, calls the core, converts back.

use std::path::PathBuf;
use std::sync::Arc;

use minijinja::value::Value;
use numpy::IntoPyArray;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::chat::Conversation;
use crate::core::{ChatTokenizer, TemplateArgs, TemplateSources};
use crate::encode::CharSpans;
use crate::error::{catch_panic, Error};
use crate::label::Mode;
use crate::spans::FieldKind;
use crate::template::RenderLimits;

use super::batch_call::{self, BatchOptions};
use super::convert::{encoder_choice, ids_list, kwargs_to_values, to_conversation, to_policy};
use super::{core_err, run, to_pyerr};

/// One field's place in a render, as `message_spans` returns it: `(message, kind, start, end)`.
type SpanRow = (usize, &'static str, usize, usize);

/// The compiled core: a tokenizer with its chat templates.
#[pyclass(name = "ChatTokenizer", module = "chatmask._core", frozen)]
pub struct PyChatTokenizer {
    pub(super) inner: Arc<ChatTokenizer>,
}

impl PyChatTokenizer {
    pub(super) fn args(
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
        let p = to_policy(&self.inner, policy)?;
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
    /// arrays `input_ids`, `labels`, `message_index`, `straddles_start`, plus `span_method`,
    /// `straddling`, `positions_derived`, `truncated`; `None` when `overflow="drop"` drops it.
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
        let policy = to_policy(&self.inner, policy)?;
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
        d.set_item("straddles_start", out.straddles_start.into_pyarray(py))?;
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
    #[pyo3(signature = (conversations, mode="last", finish_reason=None, num_threads=None, on_error="raise", ids_dtype="int32", chat_template=None, policy=None, shape=None, judge=None, **kwargs))]
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
        judge: Option<&Bound<'py, PyDict>>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        batch_call::tokenize_batch(
            self,
            py,
            conversations,
            BatchOptions {
                mode,
                finish_reason,
                num_threads,
                on_error,
                ids_dtype,
                chat_template,
                policy,
                shape,
                judge,
            },
            kwargs,
        )
    }
}
