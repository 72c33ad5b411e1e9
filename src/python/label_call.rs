//! The single-row label calls of `ChatTokenizer`: reference labels, policy labels, message
//! spans and token positions. Each converts its arguments, calls the core, converts back.

use minijinja::value::Value;
use numpy::IntoPyArray;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::encode::CharSpans;
use crate::error::{catch_panic, Error};
use crate::label::Mode;
use crate::spans::FieldKind;

use super::convert::{ids_list, to_conversation, to_policy};
use super::tokenizer::PyChatTokenizer;
use super::{core_err, run};

/// One field's place in a render, as `message_spans` returns it: `(message, kind, start, end)`.
type SpanRow = (usize, &'static str, usize, usize);

#[pymethods]
impl PyChatTokenizer {
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
}
