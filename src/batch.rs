//! Many conversations at once: rayon over rows, per-row errors, flat output buffers.
//!
//! The caller feeds rows in chunks: while the pool labels one chunk, the caller converts the
//! next (holding the GIL only for that) and appends the finished chunk to the flat output. So
//! the only transient memory is a couple of chunks of per-row vectors, and conversion overlaps
//! compute. Output order is input order whatever the thread count.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use minijinja::value::Value;
use rayon::prelude::*;

use crate::chat::Conversation;
use crate::core::{ChatTokenizer, TemplateArgs};
use crate::error::{catch_panic, Error, Result};
use crate::label::{Labeled, Mode};
use crate::policy::{Policy, SpanMethod, Tokenized};
use crate::truth::Judged;

/// Rows per chunk: enough work per chunk to keep every thread busy, small enough that
/// converting the first chunk (the part that cannot overlap) is short.
pub const CHUNK_ROWS: usize = 256;

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
    /// Under a policy: per token, the message it belongs to (-1: template text).
    pub message_index: Vec<i32>,
    /// Under a policy: per token, whether it straddles the start of its message
    /// ([`crate::policy::Tokenized::straddles_start`]).
    pub straddles_start: Vec<bool>,
    /// Under a policy, per output row: how its spans were found, trained tokens straddling a
    /// span edge, whether token positions were derived from the tokens, tokens truncated.
    pub span_methods: Vec<SpanMethod>,
    pub straddling: Vec<u32>,
    pub positions_derived: Vec<bool>,
    pub truncated: Vec<u32>,
    /// Per output row: whether an input string held a control token's text.
    pub control_rows: Vec<bool>,
    /// Rows the policy's `overflow="drop"` removed.
    pub dropped: Vec<usize>,
    /// Judged reference rows: per output row, the verdict bits (`crate::truth`).
    pub verdicts: Vec<u8>,
    /// Judged reference rows: the failing input rows whose span labels exist ("raises").
    pub raised: Vec<usize>,
}

impl BatchOutput {
    fn push_reference(&mut self, row: usize, l: Labeled, control: bool) {
        self.control_rows.push(control);
        self.input_ids.extend_from_slice(&l.tokens);
        self.labels.extend_from_slice(&l.masks);
        self.offsets.push(self.input_ids.len() as i64);
        self.label_offsets.push(self.labels.len() as i64);
        self.rows.push(row as i64);
    }
}

/// What a batch computes per row.
#[derive(Debug, Clone)]
pub enum Task {
    /// The reference's labels (or generation blocks).
    Reference(Mode),
    /// Span-based labels and `message_index` under a policy.
    Policy(Arc<Policy>),
    /// The reference's labels, each row judged on its spans under this policy (`crate::truth`).
    Judged(Mode, Arc<Policy>),
}

/// One labelled row; `None` when the policy dropped it.
pub enum RowResult {
    /// The labels, and whether an input string held a control token's text.
    Reference(Labeled, bool),
    Policy(Option<(Tokenized, SpanMethod)>),
    /// A judged reference row: the labels and control flag with the verdict, or the failure.
    Judged(Judged, bool),
}

/// What to do with a row that fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Raise,
    Skip,
}

/// One input row: the conversation, its own template arguments (a row's `tools`), and
/// whether its finish reason is "length".
pub struct RowInput {
    pub conversation: Conversation,
    pub overrides: Vec<(String, Value)>,
    pub finish_length: bool,
}

/// A row that could not even be converted carries its error in.
pub type Row = std::result::Result<RowInput, Error>;

/// The shared template arguments, and what a row with overrides needs to build its own.
pub struct BatchArgs {
    pub shared: TemplateArgs,
    pub chat_template: Option<String>,
    pub kwargs: Vec<(String, Value)>,
}

impl BatchArgs {
    /// The template arguments of a row with its own (`tools`, `documents`); None: the shared.
    pub fn for_row(
        &self,
        tok: &ChatTokenizer,
        overrides: Vec<(String, Value)>,
    ) -> Result<Option<TemplateArgs>> {
        if overrides.is_empty() {
            return Ok(None);
        }
        let mut kwargs = self.kwargs.clone();
        kwargs.extend(overrides);
        tok.template_args(self.chat_template.as_deref(), kwargs)
            .map(Some)
    }
}

fn label_row(
    tok: &ChatTokenizer,
    row: RowInput,
    task: &Task,
    args: &BatchArgs,
) -> Result<RowResult> {
    let own = args.for_row(tok, row.overrides)?;
    let template_args = own.as_ref().unwrap_or(&args.shared);
    match task {
        Task::Reference(mode) => {
            let labeled = tok.label(&row.conversation, *mode, row.finish_length, template_args)?;
            // Only counted here; a template whose literal text cannot be read counts none.
            let control = tok
                .has_control_tokens(&row.conversation, template_args)
                .unwrap_or(false);
            Ok(RowResult::Reference(labeled, control))
        }
        Task::Policy(policy) => tok
            .tokenize(&row.conversation, policy, false, template_args)
            .map(RowResult::Policy),
        Task::Judged(mode, judge) => {
            let judged = tok.label_judged(
                &row.conversation,
                *mode,
                row.finish_length,
                template_args,
                judge,
            );
            let control = tok
                .has_control_tokens(&row.conversation, template_args)
                .unwrap_or(false);
            Ok(RowResult::Judged(judged, control))
        }
    }
}

/// A thread pool owned by this process. Rebuilt after `fork()`: a child inherits the pool's
/// bookkeeping but not its threads, and would wait on them forever.
pub(crate) fn pool(num_threads: usize) -> Result<Arc<rayon::ThreadPool>> {
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

/// After `fork()`, the `tokenizers` crate's global rayon pool (which its trainer and batch
/// helpers use) has no threads in the child; switch that parallelism off there, as the
/// Python `tokenizers` package does, instead of deadlocking. Our own pool is rebuilt by pid.
pub fn install_fork_handler() {
    extern "C" fn in_child() {
        tokenizers::utils::parallelism::set_parallelism(false);
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe {
        libc::pthread_atfork(None, None, Some(in_child));
    });
}

/// Thread count: the argument, else `RAYON_NUM_THREADS`, else every core.
pub fn resolve_threads(num_threads: Option<usize>) -> usize {
    num_threads
        .filter(|&n| n > 0)
        .or_else(|| {
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n| n > 0)
        })
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A chunk submitted to the pool; `wait` blocks until it is labelled.
pub struct Pending {
    first_row: usize,
    rows: usize,
    results: mpsc::Receiver<Vec<Result<RowResult>>>,
}

impl Pending {
    pub fn wait(self) -> (usize, Vec<Result<RowResult>>) {
        // Rows are labelled under `catch_panic`, so the sender disappears only if the pool
        // itself failed; every row of the chunk then becomes an error, none goes missing.
        let results = self
            .results
            .recv()
            .ok()
            .filter(|r| r.len() == self.rows)
            .unwrap_or_else(|| {
                (0..self.rows)
                    .map(|_| Err(Error::Internal("a batch worker thread died".into())))
                    .collect()
            });
        (self.first_row, results)
    }
}

/// Labels chunks of rows on a private pool and collects them, in order, into a [`BatchOutput`].
pub struct BatchRunner {
    tok: Arc<ChatTokenizer>,
    args: Arc<BatchArgs>,
    task: Task,
    on_error: OnError,
    /// `None` with one thread: rows are labelled on the calling thread, so "1 thread" uses one
    /// core (no pool thread labelling while the caller converts the next chunk).
    pool: Option<Arc<rayon::ThreadPool>>,
    pub out: BatchOutput,
    next_row: usize,
}

impl BatchRunner {
    pub fn new(
        tok: Arc<ChatTokenizer>,
        args: BatchArgs,
        task: Task,
        on_error: OnError,
        num_threads: Option<usize>,
    ) -> Result<Self> {
        let threads = resolve_threads(num_threads);
        Ok(BatchRunner {
            tok,
            args: Arc::new(args),
            task,
            on_error,
            pool: if threads > 1 {
                Some(pool(threads)?)
            } else {
                None
            },
            out: BatchOutput {
                offsets: vec![0],
                label_offsets: vec![0],
                ..Default::default()
            },
            next_row: 0,
        })
    }

    /// Starts labelling the next rows in the background (with one thread: labels them now,
    /// so call it without the GIL).
    pub fn submit(&mut self, chunk: Vec<Row>) -> Pending {
        let (tx, rx) = mpsc::sync_channel(1);
        let (tok, args, task) = (self.tok.clone(), self.args.clone(), self.task.clone());
        let expected = chunk.len();
        let label =
            move |row: Row| row.and_then(|r| catch_panic(|| label_row(&tok, r, &task, &args)));
        match &self.pool {
            None => {
                let _ = tx.send(chunk.into_iter().map(label).collect());
            }
            Some(pool) => {
                let inner = pool.clone();
                pool.spawn(move || {
                    let labeled: Vec<Result<RowResult>> =
                        inner.install(|| chunk.into_par_iter().map(label).collect());
                    let _ = tx.send(labeled);
                });
            }
        }
        let pending = Pending {
            first_row: self.next_row,
            rows: expected,
            results: rx,
        };
        self.next_row += expected;
        pending
    }

    /// Appends a finished chunk. With `OnError::Raise` the first failing row (in input order)
    /// is returned as `Err((row, error))`.
    pub fn collect(
        &mut self,
        first_row: usize,
        labeled: Vec<Result<RowResult>>,
    ) -> std::result::Result<(), (usize, Error)> {
        let out = &mut self.out;
        for (i, result) in labeled.into_iter().enumerate() {
            let row = first_row + i;
            match result {
                Ok(RowResult::Reference(l, control)) => out.push_reference(row, l, control),
                Ok(RowResult::Judged(Judged::Labeled(l, verdict), control)) => {
                    out.verdicts.push(verdict);
                    out.push_reference(row, l, control);
                }
                Ok(RowResult::Judged(Judged::Failed { error, .. }, _))
                    if self.on_error == OnError::Raise =>
                {
                    return Err((row, error))
                }
                Ok(RowResult::Judged(Judged::Failed { error, spans_work }, _)) => {
                    if spans_work {
                        out.raised.push(row);
                    }
                    out.errors.push((row, error));
                }
                Ok(RowResult::Policy(None)) => out.dropped.push(row),
                Ok(RowResult::Policy(Some((t, method)))) => {
                    out.control_rows.push(t.control_found);
                    out.input_ids.extend_from_slice(&t.input_ids);
                    out.labels.extend_from_slice(&t.labels);
                    out.message_index.extend_from_slice(&t.message_index);
                    out.straddles_start.extend_from_slice(&t.straddles_start);
                    out.offsets.push(out.input_ids.len() as i64);
                    out.label_offsets.push(out.labels.len() as i64);
                    out.rows.push(row as i64);
                    out.span_methods.push(method);
                    out.straddling.push(t.straddling as u32);
                    out.positions_derived.push(t.positions_derived);
                    out.truncated.push(t.truncated as u32);
                }
                Err(e) if self.on_error == OnError::Raise => return Err((row, e)),
                Err(e) => out.errors.push((row, e)),
            }
        }
        Ok(())
    }
}
