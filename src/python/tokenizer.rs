//! The `ChatTokenizer` class: each method converts its arguments, calls the core, converts back.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::chat::Conversation;
use crate::core::{ChatTokenizer, TemplateArgs, TemplateSources};
use crate::error::Error;
use crate::template::RenderLimits;

use super::batch_call::{self, BatchOptions};
use super::convert::{encoder_choice, ids_list, kwargs_to_values, to_conversation};
use super::{core_err, run, to_pyerr};

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
    pub(super) fn prepare(
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
