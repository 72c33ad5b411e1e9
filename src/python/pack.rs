//! The packing functions of `chatmask._core` (registered from `python/mod.rs`): conversions only;
//! the work is `crate::pack`, run with the GIL released.

use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::pack::{self, Long, Piece, Plan, Strategy};

/// The elements of a 1-D numpy array, which must be contiguous (`name` for the error).
fn contiguous<'a, T: numpy::Element>(
    a: &'a PyReadonlyArray1<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be contiguous")))
}

fn u64s(a: &PyReadonlyArray1<'_, i64>, name: &str) -> PyResult<Vec<u64>> {
    let s = contiguous(a, name)?;
    s.iter()
        .map(|&x| {
            u64::try_from(x)
                .map_err(|_| PyValueError::new_err(format!("{name} holds a negative value {x}")))
        })
        .collect()
}

/// The packing plan for rows `offsets[i]..offsets[i+1]`: which piece of which row goes into
/// which pack. `rows` names the rows in errors (`row {rows[i]}: ...`).
#[pyfunction]
#[pyo3(signature = (offsets, label_offsets, rows, max_length, strategy, overflow))]
pub fn pack_plan<'py>(
    py: Python<'py>,
    offsets: PyReadonlyArray1<'py, i64>,
    label_offsets: PyReadonlyArray1<'py, i64>,
    rows: PyReadonlyArray1<'py, i64>,
    max_length: u64,
    strategy: &str,
    overflow: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let strategy = Strategy::parse(strategy).map_err(PyValueError::new_err)?;
    let long = Long::parse(overflow).map_err(PyValueError::new_err)?;
    let offsets = u64s(&offsets, "offsets")?;
    let label_offsets = u64s(&label_offsets, "label_offsets")?;
    let rows = contiguous(&rows, "rows")?;
    if rows.len() + 1 != offsets.len() {
        return Err(PyValueError::new_err(format!(
            "{} rows but {} offsets",
            rows.len(),
            offsets.len()
        )));
    }
    let plan = py
        .detach(|| pack::plan(&offsets, &label_offsets, max_length, strategy, long))
        .map_err(|e| {
            let row = rows.get(e.row).copied().unwrap_or(e.row as i64);
            PyValueError::new_err(format!("row {row}: {}", e.reason))
        })?;
    let d = PyDict::new(py);
    let col = |f: fn(&Piece) -> i64| plan.pieces.iter().map(f).collect::<Vec<i64>>();
    d.set_item("piece_row", col(|p| p.row as i64).into_pyarray(py))?;
    d.set_item("piece_start", col(|p| p.start as i64).into_pyarray(py))?;
    d.set_item("piece_len", col(|p| p.len as i64).into_pyarray(py))?;
    let idx = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
    d.set_item(
        "pack_offsets",
        plan.pack_offsets
            .iter()
            .map(|&x| x as i64)
            .collect::<Vec<i64>>()
            .into_pyarray(py),
    )?;
    d.set_item("dropped", idx(&plan.dropped).into_pyarray(py))?;
    d.set_item("truncated", idx(&plan.truncated).into_pyarray(py))?;
    d.set_item("split", idx(&plan.split).into_pyarray(py))?;
    Ok(d)
}

fn plan_of(
    start: &[i64],
    len: &[i64],
    pack_offsets: &[i64],
    src_len: usize,
    max_length: u64,
) -> PyResult<Plan> {
    if start.len() != len.len() || pack_offsets.last().copied().unwrap_or(0) as usize != start.len()
    {
        return Err(PyValueError::new_err(
            "piece arrays and pack_offsets disagree",
        ));
    }
    let mut pieces = Vec::with_capacity(start.len());
    for (&s, &l) in start.iter().zip(len) {
        if s < 0 || l < 0 || (s + l) as usize > src_len {
            return Err(PyValueError::new_err(format!(
                "piece {s}+{l} outside a buffer of {src_len}"
            )));
        }
        pieces.push(Piece {
            row: 0,
            start: s as u64,
            len: l as u64,
        });
    }
    let mut offs = Vec::with_capacity(pack_offsets.len());
    for w in pack_offsets.windows(2) {
        if w[0] < 0 || w[1] < w[0] || w[1] as usize > len.len() {
            return Err(PyValueError::new_err(
                "pack_offsets must be non-decreasing from 0",
            ));
        }
        let used: i64 = len[w[0] as usize..w[1] as usize].iter().sum();
        if used as u64 > max_length {
            return Err(PyValueError::new_err(format!(
                "a pack of {used} tokens exceeds max_length {max_length}"
            )));
        }
    }
    offs.extend(pack_offsets.iter().map(|&x| x as u64));
    Ok(Plan {
        pieces,
        pack_offsets: offs,
        ..Plan::default()
    })
}

macro_rules! gather_as {
    ($py:expr, $src:expr, $t:ty, $start:expr, $len:expr, $po:expr, $max:expr, $pad:expr, $first:expr) => {
        if let Ok(a) = $src.extract::<PyReadonlyArray1<'_, $t>>() {
            let s = contiguous(&a, "src")?;
            let plan = plan_of($start, $len, $po, s.len(), $max)?;
            let pad = $pad.map(|v| v as $t);
            let first = $first.map(|v| v as $t);
            let out = $py.detach(|| pack::gather(s, &plan, $max, pad, first));
            return Ok(out.into_pyarray($py).into_any());
        }
    };
}

/// One flat buffer (int32, uint32 or int64) along a plan: every pack's pieces in order,
/// `first` in place of each piece's first value, `pad` filling packs to `max_length`.
#[pyfunction]
#[pyo3(signature = (src, piece_start, piece_len, pack_offsets, max_length, pad=None, first=None))]
#[allow(clippy::too_many_arguments)]
pub fn pack_gather<'py>(
    py: Python<'py>,
    src: &Bound<'py, PyAny>,
    piece_start: PyReadonlyArray1<'py, i64>,
    piece_len: PyReadonlyArray1<'py, i64>,
    pack_offsets: PyReadonlyArray1<'py, i64>,
    max_length: u64,
    pad: Option<i64>,
    first: Option<i64>,
) -> PyResult<Bound<'py, PyAny>> {
    let start = contiguous(&piece_start, "piece_start")?;
    let len = contiguous(&piece_len, "piece_len")?;
    let po = contiguous(&pack_offsets, "pack_offsets")?;
    gather_as!(py, src, i32, start, len, po, max_length, pad, first);
    gather_as!(py, src, u32, start, len, po, max_length, pad, first);
    gather_as!(py, src, i64, start, len, po, max_length, pad, first);
    Err(PyTypeError::new_err(
        "src must be a 1-d int32, uint32 or int64 array",
    ))
}

/// `position_ids` along a plan (0..len-1 per piece; padding continues the count, capped at
/// `max_length - 1`).
#[pyfunction]
#[pyo3(signature = (piece_len, pack_offsets, max_length, pad))]
pub fn pack_positions<'py>(
    py: Python<'py>,
    piece_len: PyReadonlyArray1<'py, i64>,
    pack_offsets: PyReadonlyArray1<'py, i64>,
    max_length: u64,
    pad: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let len = contiguous(&piece_len, "piece_len")?;
    let po = contiguous(&pack_offsets, "pack_offsets")?;
    let start = vec![0i64; len.len()];
    let plan = plan_of(&start, len, po, usize::MAX, max_length)?;
    let out = py.detach(|| pack::positions(&plan, max_length, pad));
    Ok(out.into_pyarray(py).into_any())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(pack_plan, m)?)?;
    m.add_function(wrap_pyfunction!(pack_gather, m)?)?;
    m.add_function(wrap_pyfunction!(pack_positions, m)?)?;
    Ok(())
}
