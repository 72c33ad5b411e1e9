//! `ChatTokenizer.tokenize_batch`: rows converted a chunk at a time with the GIL held while the
//! pool labels the previous chunk without it, then the flat buffers as numpy arrays.

use std::sync::Arc;

use numpy::IntoPyArray;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::convert::{kwargs_to_values, to_policy, to_row, to_shape};
use super::tokenizer::PyChatTokenizer;
use super::{core_err, to_pyerr};
use crate::batch::{self, BatchOutput, OnError};
use crate::error::Error;
use crate::label::Mode;

/// The call's options, as `tokenize_batch` takes them.
pub(super) struct BatchOptions<'a, 'py> {
    pub mode: &'a str,
    pub finish_reason: Option<&'a Bound<'py, PyAny>>,
    pub num_threads: Option<usize>,
    pub on_error: &'a str,
    pub ids_dtype: &'a str,
    pub chat_template: Option<&'a str>,
    pub policy: Option<&'a Bound<'py, PyDict>>,
    pub shape: Option<&'a Bound<'py, PyDict>>,
    pub judge: Option<&'a Bound<'py, PyDict>>,
}

pub(super) fn tokenize_batch<'py>(
    tok: &PyChatTokenizer,
    py: Python<'py>,
    conversations: &Bound<'py, PyAny>,
    options: BatchOptions<'_, 'py>,
    kwargs: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyDict>> {
    let BatchOptions {
        mode,
        finish_reason,
        num_threads,
        on_error,
        ids_dtype,
        chat_template,
        policy,
        shape,
        judge,
    } = options;
    let shape = shape.map(to_shape).transpose()?;
    let mode = || Mode::parse(mode).map_err(|e| PyValueError::new_err(e.to_string()));
    let task = match (policy, judge) {
        (Some(_), Some(_)) => {
            return Err(PyValueError::new_err(
                "judge applies to the reference modes, not with a policy",
            ))
        }
        (Some(p), None) => batch::Task::Policy(Arc::new(to_policy(&tok.inner, p)?)),
        (None, Some(j)) => batch::Task::Judged(mode()?, Arc::new(to_policy(&tok.inner, j)?)),
        (None, None) => batch::Task::Reference(mode()?),
    };
    let judged = judge.is_some();
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
    let args = batch_args(tok, py, chat_template, kwargs)?;
    let mut runner = batch::BatchRunner::new(tok.inner.clone(), args, task, on_error, num_threads)
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
    into_dict(py, runner.out, ids_dtype, with_policy, judged)
}

/// The batch's flat buffers as the dict `TokenizedBatch(**d)` takes (plus the judge's verdicts).
fn into_dict<'py>(
    py: Python<'py>,
    out: BatchOutput,
    ids_dtype: &str,
    with_policy: bool,
    judged: bool,
) -> PyResult<Bound<'py, PyDict>> {
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
        d.set_item("straddles_start", out.straddles_start.into_pyarray(py))?;
        let methods: Vec<&str> = out.span_methods.iter().map(|m| m.name()).collect();
        d.set_item("span_methods", methods)?;
        d.set_item("straddling", out.straddling.into_pyarray(py))?;
        d.set_item("positions_derived", out.positions_derived.into_pyarray(py))?;
        d.set_item("truncated", out.truncated.into_pyarray(py))?;
        d.set_item("dropped", out.dropped)?;
    }
    if judged {
        d.set_item("reference_verdicts", out.verdicts.into_pyarray(py))?;
        d.set_item("reference_raised", out.raised)?;
    }
    let errors = PyList::empty(py);
    for (row, e) in &out.errors {
        errors.append((row, e.to_string()))?;
    }
    d.set_item("errors", errors)?;
    Ok(d)
}

/// The shared template arguments of a batch call, and what a row's own `tools` adds to.
pub(super) fn batch_args(
    tok: &PyChatTokenizer,
    py: Python<'_>,
    chat_template: Option<&str>,
    kwargs: Option<&Bound<'_, PyDict>>,
) -> PyResult<batch::BatchArgs> {
    let values = kwargs_to_values(kwargs).map_err(core_err(py))?;
    let shared = tok
        .inner
        .template_args(chat_template, values.clone())
        .map_err(core_err(py))?;
    Ok(batch::BatchArgs {
        shared,
        chat_template: chat_template.map(str::to_string),
        kwargs: values,
    })
}
