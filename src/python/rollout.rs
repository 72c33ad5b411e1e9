//! `ChatTokenizer.tokenize_rollout_batch`: rows converted with the GIL held, placed in parallel
//! without it, returned as flat arrays.

use numpy::IntoPyArray;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PySequence};
use rayon::prelude::*;

use crate::batch;
use crate::error::{catch_panic, Error};
use crate::rollout::{Rollout, RolloutRequest};

use super::batch_call::batch_args;
use super::convert::{to_policy, to_row};
use super::tokenizer::PyChatTokenizer;
use super::{core_err, to_pyerr};

/// One input row: the conversation and its own template arguments, and the sampled ids per
/// assistant message.
type RolloutRow = (batch::RowInput, Vec<Option<Vec<u32>>>);

/// A mapping with `messages`, `completion_ids`, optional `finish_reason`, `tools`, `documents`.
fn read_row(row: &Bound<'_, PyAny>) -> Result<RolloutRow, Error> {
    let bad = |what: &str| Error::InvalidInput(format!("a rollout row {what}"));
    let d = row
        .cast::<PyDict>()
        .map_err(|_| bad("is a mapping with 'messages' and 'completion_ids'"))?;
    let mut input = to_row(row, None)?;
    let completions = d
        .get_item("completion_ids")
        .ok()
        .flatten()
        .ok_or_else(|| bad("has no 'completion_ids'"))?;
    let completions = completions
        .cast::<PySequence>()
        .map_err(|_| bad("has a 'completion_ids' that is not a list"))?;
    let mut sampled = Vec::with_capacity(completions.len().unwrap_or(0));
    for (turn, ids) in completions
        .try_iter()
        .map_err(|e| bad(&e.to_string()))?
        .enumerate()
    {
        let ids = ids.map_err(|e| bad(&e.to_string()))?;
        if ids.is_none() {
            sampled.push(None);
            continue;
        }
        let ids: Vec<u32> = ids.extract().map_err(|_| {
            Error::InvalidInput(format!(
                "completion_ids[{turn}] is not None or a list of token ids (non-negative ints)"
            ))
        })?;
        sampled.push(Some(ids));
    }
    if let Some(reason) = d.get_item("finish_reason").ok().flatten() {
        if !reason.is_none() {
            let reason: String = reason
                .extract()
                .map_err(|_| bad("has a 'finish_reason' that is not a string or None"))?;
            input.finish_length = reason == "length";
        }
    }
    Ok((input, sampled))
}

/// Flat arrays of the rollouts that worked, in input order.
fn to_dict<'py>(
    py: Python<'py>,
    done: Vec<(usize, Rollout)>,
    errors: Vec<(usize, String)>,
) -> PyResult<Bound<'py, PyDict>> {
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let mut message_index = Vec::new();
    let mut offsets = vec![0i64];
    let mut rows = Vec::with_capacity(done.len());
    let mut turn_offsets = vec![0i64];
    let (mut message, mut start, mut end) = (Vec::new(), Vec::new(), Vec::new());
    let (mut same, mut placed, mut stop) = (Vec::new(), Vec::new(), Vec::new());
    let (mut extends, mut differs) = (Vec::new(), Vec::new());
    let tri = |v: Option<bool>| v.map_or(-1i8, i8::from);
    for (row, out) in done {
        rows.push(row as i64);
        ids.extend(out.input_ids);
        labels.extend(out.labels);
        message_index.extend(out.message_index);
        offsets.push(ids.len() as i64);
        for t in &out.turns {
            message.push(t.message as i32);
            start.push(t.tokens.start as i64);
            end.push(t.tokens.end as i64);
            same.push(t.retokenized_same);
            placed.push(t.placed);
            stop.push(t.stop.name());
            extends.push(tri(t.extends_previous));
            differs.push(tri(t.bridge_differs));
        }
        turn_offsets.push(message.len() as i64);
    }
    let d = PyDict::new(py);
    d.set_item("input_ids", ids.into_pyarray(py))?;
    d.set_item("labels", labels.into_pyarray(py))?;
    d.set_item("message_index", message_index.into_pyarray(py))?;
    d.set_item("offsets", offsets.into_pyarray(py))?;
    d.set_item("rows", rows.into_pyarray(py))?;
    d.set_item("turn_offsets", turn_offsets.into_pyarray(py))?;
    d.set_item("turn_message", message.into_pyarray(py))?;
    d.set_item("turn_start", start.into_pyarray(py))?;
    d.set_item("turn_end", end.into_pyarray(py))?;
    d.set_item("retokenized_same", same.into_pyarray(py))?;
    d.set_item("placed", placed.into_pyarray(py))?;
    d.set_item("stop", PyList::new(py, stop)?)?;
    d.set_item("extends_previous", extends.into_pyarray(py))?;
    d.set_item("bridge_differs", differs.into_pyarray(py))?;
    d.set_item("errors", errors)?;
    Ok(d)
}

#[pymethods]
impl PyChatTokenizer {
    /// Rollouts placed in parallel with the GIL released: each row a mapping with `messages`,
    /// `completion_ids`, optional `finish_reason`, `tools`, `documents`. Returns flat arrays (`offsets` per row, `turn_offsets` per sampled turn)
    /// and the `(row, message)` errors (`on_error="skip"`).
    #[pyo3(signature = (rows, policy, bridge=false, num_threads=None, on_error="raise", chat_template=None, **kwargs))]
    #[allow(clippy::too_many_arguments)]
    fn tokenize_rollout_batch<'py>(
        &self,
        py: Python<'py>,
        rows: &Bound<'py, PyAny>,
        policy: &Bound<'py, PyDict>,
        bridge: bool,
        num_threads: Option<usize>,
        on_error: &str,
        chat_template: Option<&str>,
        kwargs: Option<&Bound<'py, PyDict>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let skip = match on_error {
            "raise" => false,
            "skip" => true,
            other => {
                return Err(PyValueError::new_err(format!(
                    "on_error must be 'raise' or 'skip', not {other:?}"
                )))
            }
        };
        let policy = to_policy(&self.inner, policy)?;
        let args = batch_args(self, py, chat_template, kwargs)?;
        let mut read = Vec::new();
        let mut errors = Vec::new();
        for (i, row) in rows.try_iter()?.enumerate() {
            match read_row(&row?) {
                Ok(r) => read.push((i, r)),
                Err(e) if skip => errors.push((i, e.to_string())),
                Err(e) => return Err(to_pyerr(py, &e, Some(i))),
            }
        }
        let inner = &self.inner;
        let pool = batch::pool(batch::resolve_threads(num_threads)).map_err(core_err(py))?;
        let results: Vec<(usize, Result<Rollout, Error>)> = py.detach(|| {
            pool.install(|| {
                read.par_iter()
                    .map(|(i, (input, completions))| {
                        let request = RolloutRequest {
                            completions,
                            length: input.finish_length,
                            bridge,
                        };
                        let placed = catch_panic(|| {
                            let own = args.for_row(inner, input.overrides.clone())?;
                            let template_args = own.as_ref().unwrap_or(&args.shared);
                            inner.tokenize_rollout(
                                &input.conversation,
                                &request,
                                &policy,
                                template_args,
                            )
                        });
                        (*i, placed)
                    })
                    .collect()
            })
        });
        let mut done = Vec::with_capacity(results.len());
        for (i, result) in results {
            match result {
                Ok(out) => done.push((i, out)),
                Err(e) if skip => errors.push((i, e.to_string())),
                Err(e) => return Err(to_pyerr(py, &e, Some(i))),
            }
        }
        errors.sort_unstable_by_key(|e| e.0);
        to_dict(py, done, errors)
    }
}
