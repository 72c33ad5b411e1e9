//! The core's JSONL rows (`parse_jsonl`, `JsonRow`): read in parallel, nothing left to convert.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::batch::{self};
use crate::chat::Conversation;
use crate::error::Error;
use crate::rows::{self, JsonRow, RowFields, Shape};

use super::convert::to_shape;

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
    pub(super) fn to_row(&self, shape: Option<&Shape>) -> batch::Row {
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
pub(super) fn parse_jsonl<'py>(
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
