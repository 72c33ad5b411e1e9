//! Many conversations at once: rayon over rows, per-row errors, flat output buffers.
//!
//! Rows are labelled in chunks so the per-row vectors of one chunk are the only transient
//! memory besides the flat output. Output order is input order whatever the thread count.

use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::chat::Conversation;
use crate::core::{ChatTokenizer, TemplateArgs};
use crate::error::{Error, Result};
use crate::label::{Labeled, Mode};

const CHUNK_ROWS: usize = 2048;

/// Flat results: row `i` of the output is `input_ids[offsets[i]..offsets[i+1]]` and
/// `labels[label_offsets[i]..label_offsets[i+1]]`. Labels have their own offsets because the
/// reference can return more labels than tokens.
#[derive(Debug, Default)]
pub struct BatchOutput {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub offsets: Vec<i64>,
    pub label_offsets: Vec<i64>,
    pub rows: Vec<i64>,
    pub errors: Vec<(usize, Error)>,
}

/// What to do with a row that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Raise,
    Skip,
}

/// One input row: the conversation, and template arguments of its own (a row's `tools`).
pub struct RowInput {
    pub conversation: Conversation,
    pub overrides: Vec<(String, minijinja::value::Value)>,
}

/// A row that could not even be converted carries its error in.
pub type Row = std::result::Result<RowInput, Error>;

/// The shared template arguments, and how to build a row's own when it has overrides.
pub struct BatchArgs<'a> {
    pub shared: TemplateArgs,
    pub chat_template: Option<&'a str>,
    pub kwargs: Vec<(String, minijinja::value::Value)>,
}

fn label_row(tok: &ChatTokenizer, row: RowInput, mode: Mode, finish_length: bool, args: &BatchArgs<'_>) -> Result<Labeled> {
    if row.overrides.is_empty() {
        return tok.label(&row.conversation, mode, finish_length, &args.shared);
    }
    let mut kwargs = args.kwargs.clone();
    kwargs.extend(row.overrides);
    let own = tok.template_args(args.chat_template, kwargs)?;
    tok.label(&row.conversation, mode, finish_length, &own)
}

/// A thread pool owned by this process. Rebuilt after `fork()`: a child inherits the pool's
/// bookkeeping but not its threads, and would wait on them forever.
fn pool(num_threads: usize) -> Result<Arc<rayon::ThreadPool>> {
    static POOL: Mutex<Option<(u32, usize, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((p, n, pool)) = slot.as_ref() {
        if *p == pid && *n == num_threads {
            return Ok(pool.clone());
        }
    }
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(num_threads)
        .thread_name(|i| format!("chatmask-{i}"))
        .build()
        .map_err(|e| Error::InvalidInput(format!("cannot start {num_threads} threads: {e}")))?;
    let built = Arc::new(built);
    *slot = Some((pid, num_threads, built.clone()));
    Ok(built)
}

/// Thread count: the argument, else `RAYON_NUM_THREADS`, else every core.
pub fn resolve_threads(num_threads: Option<usize>) -> usize {
    num_threads
        .filter(|&n| n > 0)
        .or_else(|| std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Labels every row. With `OnError::Raise` the first failing row (in input order) is returned
/// as `Err((row, error))`.
pub fn run(
    tok: &ChatTokenizer,
    rows: Vec<Row>,
    mode: Mode,
    finish_length: &(dyn Fn(usize) -> bool + Sync),
    args: &BatchArgs<'_>,
    on_error: OnError,
    num_threads: Option<usize>,
) -> std::result::Result<BatchOutput, (usize, Error)> {
    let pool = pool(resolve_threads(num_threads)).map_err(|e| (0, e))?;
    let mut out = BatchOutput { offsets: vec![0], label_offsets: vec![0], ..Default::default() };
    let mut rows = rows;
    let mut base = 0;
    while !rows.is_empty() {
        let rest = rows.split_off(rows.len().min(CHUNK_ROWS));
        let chunk = std::mem::replace(&mut rows, rest);
        let labeled: Vec<Result<Labeled>> = pool.install(|| {
            chunk
                .into_par_iter()
                .enumerate()
                .map(|(i, row)| row.and_then(|r| label_row(tok, r, mode, finish_length(base + i), args)))
                .collect()
        });
        for (i, result) in labeled.into_iter().enumerate() {
            let row = base + i;
            match result {
                Ok(l) => {
                    out.input_ids.extend_from_slice(&l.tokens);
                    out.labels.extend_from_slice(&l.masks);
                    out.offsets.push(out.input_ids.len() as i64);
                    out.label_offsets.push(out.labels.len() as i64);
                    out.rows.push(row as i64);
                }
                Err(e) if on_error == OnError::Raise => return Err((row, e)),
                Err(e) => out.errors.push((row, e)),
            }
        }
        base += CHUNK_ROWS;
    }
    Ok(out)
}
