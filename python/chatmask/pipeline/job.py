"""The ``chatmask tokenize`` job: read batches, run the stages, place the output rows into parts
and commit them in row order (protocol: :mod:`chatmask.pipeline.state`).

* **Output columns.** ``row`` (int64), the stages' columns (``input_ids`` list<int32>, ``labels``
  list<int64> with ``-100`` = masked; under a policy ``message_index``, ``span_method``,
  ``truncated``), ``id`` (string: the row's ``id``, JSON-encoded when not a string, null when
  absent) and ``source_file``. The schema is the same for every part.
* **Accounting.** Every row ends up in exactly one place: a part, ``errors.jsonl`` or (policy
  ``overflow="drop"``) ``dropped.jsonl``; ``rows_in == rows_out + rows_failed + rows_dropped`` is
  checked before the manifest is written.
* **Broken input.** When a file stops decoding (:class:`chatmask.io.InputReadError`), the rows
  read before it are tokenized and committed, ``progress.json`` records where reading stopped,
  ``manifest.json`` is written with ``complete: false`` and the ``read_error``, and the command
  ends with one line and exit code 2. ``--resume`` continues there once the file is fixed.
* **Finish.** ``manifest.json`` is written atomically at the end, then ``progress.json`` is
  removed. ``seconds`` adds up the runs (up to each run's last commit).
"""

from __future__ import annotations

import gc
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Sequence

import numpy as np

from .._usage import UsageError
from ..io import sinks
from ..io.readers import InputFile, InputReadError, RawRow, ReadProgress, iter_raw_rows, pyarrow_modules, resolve_inputs
from ..io.sinks import DROPPED, ERRORS, MANIFEST, PROGRESS, PartWriter, SideFile
from ..preference import FLAGS_COLUMN
from ..rows import Fields, preference_columns
from ..truth import REFERENCE_MODES
from .options import TokenizeOptions, resolve_tokenize
from .packing import PackSink, pack_manifest
from .preference import PreferenceParseStage, PreferenceStage
from .progress import Progress
from .stages import DROP_REASON, Batch, FlagStage, ParseStage, Stage, TokenizeStage
from .state import State, job_config, prepare_outdir, verify_output
from .tokenizer import LoadedTokenizer, load_tokenizer


class Job:
    """The streaming loop: one batch at a time through the stages, parts and side files committed in row order."""

    def __init__(self, opts: TokenizeOptions, tokenizer: LoadedTokenizer, inputs: list[InputFile], state: State):
        self.opts = opts
        self.policy = opts.policy
        self.inputs = inputs
        self.state = state
        self.out = opts.outdir
        self.pa, _ = pyarrow_modules()
        import pyarrow.compute as pc

        self.pc = pc
        fields = (
            Fields.of_policy(self.policy)
            if self.policy is not None
            else Fields(opts.messages_field or "messages", opts.tools_field or "tools", opts.finish_reason_field)
        )
        self.columns = fields.columns()
        self.flagging = self.policy is None and opts.mode in REFERENCE_MODES
        self.stages: list[Stage] = [
            ParseStage(fields, self.policy),
            TokenizeStage(tokenizer.tok, opts, inputs, flag=self.flagging),
        ]
        if opts.task == "preference":
            assert self.policy is not None, "resolve_preference settles the policy"
            self.columns = preference_columns(self.policy)
            self.stages = [PreferenceParseStage(self.policy), PreferenceStage(tokenizer.tok, self.policy, opts.threads)]
        if self.flagging:
            self.stages.append(FlagStage())
        self.raised_rows: set[int] = set()  # error rows of the batch in hand the reference raises on
        self.pending_raised = 0
        pa = self.pa
        stage_fields = [f for stage in self.stages for f in stage.fields(pa)]
        self.schema = pa.schema([("row", pa.int64()), *stage_fields, ("id", pa.string()), ("source_file", pa.string())])
        self.errors_file = SideFile(os.path.join(self.out, ERRORS))
        self.dropped_file = SideFile(os.path.join(self.out, DROPPED)) if self.policy is not None else None
        # The part in progress: its writer, and its counts (not yet in `state`).
        self.writer: PartWriter | None = None
        self._reset_part()
        self.packer = PackSink(self) if opts.pack is not None else None  # --pack: windows of packs
        self.run_started = time.perf_counter()
        self.seconds_before = state.seconds

    def _reset_part(self) -> None:
        self.part_rows = self.part_tokens = self.part_trained = self.part_truncated = 0
        self.part_control: int | None = 0  # None: some of the part's rows went unchecked
        self.part_methods: dict[str, int] = {}
        self.part_reference: dict[str, int] = {}
        self.part_pack: dict[str, int] = {}
        self.part_flags: dict[str, int] = {}

    # -- part and commit ------------------------------------------------------------------

    def _write_rows(self, table: Any, control: np.ndarray | None) -> None:
        """Append `table` to the part in progress; `control` flags its rows with control-token text."""
        if table.num_rows == 0:
            return
        if self.writer is None:
            self.writer = PartWriter(self.out, len(self.state.parts), self.schema)
        self.writer.write(table)
        self.part_rows += table.num_rows
        tokens, trained = self.stages[1].count_tokens(table)
        self.part_tokens += tokens
        self.part_trained += trained
        self._count_rows(table, control)

    def _count_rows(self, table: Any, control: np.ndarray | None) -> None:
        """The per-row counts of a part's rows (control-token text, reference causes, span methods)."""
        pc = self.pc
        if control is None:
            self.part_control = None
        elif self.part_control is not None:
            self.part_control += int(np.count_nonzero(control))
        if self.flagging:
            for causes in table.column("reference_causes").to_pylist():
                for cause in ["unmeasured"] if causes is None else ["rows", *causes.split(",")] if causes else []:
                    self.part_reference[cause] = self.part_reference.get(cause, 0) + 1
        if FLAGS_COLUMN in table.column_names:
            PreferenceStage.count_flags(table, self.part_flags)
        if "span_method" in table.column_names:
            for method in table.column("span_method").to_pylist():
                self.part_methods[method] = self.part_methods.get(method, 0) + 1
            self.part_truncated += int(pc.sum(pc.greater(table.column("truncated"), 0)).as_py() or 0)

    def _write_errors(self, errors: Sequence[tuple[int, str, int]]) -> None:
        """Append (row, message, source index) lines in row order; flushed, fsynced only at a commit."""
        lines = []
        for row, msg, src in errors:
            line: dict[str, Any] = {"row": row, "error": msg, "source_file": self.inputs[src].name}
            if row in self.raised_rows:
                line["reference_wrong"] = "raises"  # the reference raises; the spans tokenize the row
                self.pending_raised += 1
            lines.append(line)
        self.errors_file.write(lines)

    def _write_dropped(self, dropped: Sequence[tuple[int, int, str | None]]) -> None:
        if not dropped:
            return
        assert self.dropped_file is not None, "only a policy drops rows"
        self.dropped_file.write(
            [
                {"row": row, "id": row_id, "reason": DROP_REASON, "source_file": self.inputs[src].name}
                for row, src, row_id in dropped
            ]
        )

    @property
    def pending(self) -> bool:
        return bool(self.errors_file.pending or (self.dropped_file is not None and self.dropped_file.pending))

    def _commit(self, next_row: int) -> None:
        """Side files fsynced, then the part renamed, then progress.json replaced."""
        state = self.state
        state.rows_failed += self.errors_file.sync()
        if self.pending_raised:
            for key in ("rows", "raises"):
                state.reference_wrong[key] = state.reference_wrong.get(key, 0) + self.pending_raised
            self.pending_raised = 0
        if self.dropped_file is not None:
            state.rows_dropped += self.dropped_file.sync()
        if self.writer is not None:
            name = self.writer.commit()
            self.writer = None
            state.parts.append(
                {"file": name, "rows": self.part_rows, "tokens": self.part_tokens, "trained_tokens": self.part_trained}
            )
            if self.packer is not None:
                state.parts[-1]["packs"] = self.part_pack.get("packs", 0)
            for key, count in self.part_pack.items():
                state.pack[key] = state.pack.get(key, 0) + count
            state.rows_out += self.part_rows
            state.tokens += self.part_tokens
            state.trained_tokens += self.part_trained
            if state.rows_with_control_tokens is not None:
                state.rows_with_control_tokens = (
                    None if self.part_control is None else state.rows_with_control_tokens + self.part_control
                )
            state.rows_truncated += self.part_truncated
            for method, count in self.part_methods.items():
                state.span_methods[method] = state.span_methods.get(method, 0) + count
            for cause, count in self.part_reference.items():
                state.reference_wrong[cause] = state.reference_wrong.get(cause, 0) + count
            for flag, count in self.part_flags.items():
                state.preference_flags[flag] = state.preference_flags.get(flag, 0) + count
        state.errors_bytes = self.errors_file.length
        if self.dropped_file is not None:
            state.dropped_bytes = self.dropped_file.length
        state.next_row = next_row
        state.seconds = self.seconds_before + time.perf_counter() - self.run_started
        self._reset_part()
        sinks.write_json_atomic(os.path.join(self.out, PROGRESS), state.to_json())

    # -- batches --------------------------------------------------------------------------

    def process(self, rows: list[RawRow]) -> None:
        """One batch through every stage and into the parts (see :meth:`parse`, :meth:`work`, :meth:`place`)."""
        self.place(self.work(self.parse(rows)))

    def parse(self, rows: list[RawRow]) -> Batch:
        """The first stage (row parsing, GIL-bound Python): on the calling thread."""
        batch = Batch(rows)
        self.stages[0].run(batch)
        return batch

    def work(self, batch: Batch) -> Batch:
        """The stages after parsing: the core, with the GIL released, so :func:`run_tokenize` runs
        them on a worker thread while the next batch is parsed."""
        for stage in self.stages[1:]:
            stage.run(batch)
        return batch

    def place(self, batch: Batch) -> None:
        """A finished batch into the parts and side files, in row order (on the calling thread)."""
        rows = batch.rows
        table = None
        if batch.out:
            pa = self.pa
            columns = {"row": pa.array([rows[i].row for i in batch.out], pa.int64()), **batch.columns}
            columns["id"] = pa.array([batch.parsed[i].id for i in batch.out], pa.string())
            columns["source_file"] = pa.array([self.inputs[rows[i].source].name for i in batch.out], pa.string())
            table = pa.table({name: columns[name] for name in self.schema.names}).cast(self.schema)
        batch.errors.sort()
        batch.dropped.sort()
        if self.packer is not None:  # the window commits when it is packed (see chatmask.pipeline.packing)
            self.raised_rows |= batch.reference_raised
            self.packer.add(table, batch.control, batch.errors, batch.dropped, batch.end)
            return
        self.raised_rows = batch.reference_raised
        self._place(table, batch.control, batch.errors, batch.dropped, batch.end)

    def _place(
        self,
        table: Any,
        control: np.ndarray | None,
        errors: list[tuple[int, str, int]],
        dropped: list[tuple[int, int, str | None]],
        batch_end: int,
    ) -> None:
        """Put a batch's rows into parts, committing each part as it fills (split mid-batch if needed)."""
        per_file = self.opts.rows_per_file
        while table is not None and table.num_rows > 0:
            need = per_file - self.part_rows
            if table.num_rows < need:
                self._write_rows(table, control)
                break
            head = table.slice(0, need)
            last = int(head.column("row")[need - 1].as_py())
            self._write_rows(head, None if control is None else control[:need])
            self._write_errors([e for e in errors if e[0] <= last])
            errors = [e for e in errors if e[0] > last]
            self._write_dropped([d for d in dropped if d[0] <= last])
            dropped = [d for d in dropped if d[0] > last]
            self._commit(last + 1)
            table = table.slice(need)
            control = None if control is None else control[need:]
        self._write_errors(errors)
        self._write_dropped(dropped)
        if self.writer is None and batch_end > self.state.next_row:
            self._commit(batch_end)  # nothing in progress: make the batch's errors durable too

    def finish(self, rows_in: int) -> None:
        if self.packer is not None:
            self.packer.flush()
        if self.writer is not None or rows_in > self.state.next_row or self.pending:
            self._commit(rows_in)
        self._close_files()

    def abort(self) -> None:
        """Leave the directory as a kill would (resume reconciles it); just release the files."""
        if self.writer is not None:
            self.writer.abandon()
        self._close_files()

    def _close_files(self) -> None:
        self.errors_file.close()
        if self.dropped_file is not None:
            self.dropped_file.close()


def _manifest(
    opts: TokenizeOptions,
    tokenizer: LoadedTokenizer,
    inputs: list[InputFile],
    state: State,
    rows_in: int,
    complete: bool,
) -> dict[str, Any]:
    from .. import __version__

    policy = opts.policy
    return {
        "complete": complete,
        "rows_in": rows_in,
        "rows_out": state.rows_out,
        "rows_failed": state.rows_failed,
        "rows_dropped": state.rows_dropped,
        "tokens": state.tokens,
        "trained_tokens": state.trained_tokens,
        "seconds": round(state.seconds, 3),
        "tokenizer": tokenizer.name,
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer_files": tokenizer.fingerprint["files"],
        "encoder": tokenizer.tok.encoder_backend,
        "encoder_fallback_reason": tokenizer.tok.encoder_fallback_reason,
        "mode": None if policy is not None else opts.mode,
        "messages_field": opts.messages_field,
        "tools_field": opts.tools_field,
        "finish_reason_field": opts.finish_reason_field,
        "policy": None if policy is None else policy.to_dict(),
        "span_methods": None if policy is None else dict(sorted(state.span_methods.items())),
        "rows_truncated": None if policy is None else state.rows_truncated,
        "rows_with_control_tokens": state.rows_with_control_tokens,
        "sanitize_control_tokens": policy is not None and policy.sanitize_control_tokens,
        "chatmask_version": __version__,
        "inputs": [f.path for f in inputs],
        "parts": [{"file": p["file"], "rows": p["rows"]} for p in state.parts],
        "errors_file": ERRORS,
        "dropped_file": None if policy is None else DROPPED,
        "reference_wrong": _reference_counts(state) if opts.policy is None and opts.mode in REFERENCE_MODES else None,
        "read_error": state.read_error,
        "pack": pack_manifest(opts, state),
        "task": opts.task,
        "preference_flags": dict(sorted(state.preference_flags.items())) if opts.task == "preference" else None,
    }


def _reference_counts(state: State) -> dict[str, Any]:
    """Rows whose reference mask is wrong: in total, by cause (see chatmask.truth), and not judged."""
    from ..truth import CAUSES

    counts = state.reference_wrong
    return {
        "rows": counts.get("rows", 0),
        "by_cause": {c: counts.get(c, 0) for c in CAUSES},
        "unmeasured": counts.get("unmeasured", 0),
    }


def run_tokenize(opts: TokenizeOptions) -> dict[str, Any]:
    """The whole `chatmask tokenize` job; returns the manifest. Raises UsageError for bad usage
    (and :class:`InputReadError`, after committing what was read, for an input that stops decoding)."""
    opts = resolve_tokenize(opts)
    pyarrow_modules()
    inputs = resolve_inputs(opts.inputs)
    tokenizer = load_tokenizer(opts.tokenizer, opts.encoder, opts.allow_jinja2)  # type: ignore[arg-type]
    # The long-lived objects (pyarrow, the tokenizer, transformers when imported) leave the
    # collector's view: the per-row objects would otherwise make it walk them again and again.
    gc.freeze()
    state = prepare_outdir(opts.outdir, opts.resume, job_config(opts, inputs, tokenizer))
    if state is None:
        import json
        from pathlib import Path

        manifest = json.loads(Path(opts.outdir, MANIFEST).read_text(encoding="utf-8"))
        if not opts.quiet:
            print(
                f"chatmask tokenize: {opts.outdir} is already complete (manifest.json); nothing to do", file=sys.stderr
            )
        return manifest
    job = Job(opts, tokenizer, inputs, state)
    counter = ReadProgress(inputs)
    progress = Progress(sys.stderr.isatty() and not opts.quiet, counter)
    rows_in = 0
    done_rows = done_tokens = 0
    read_error: InputReadError | None = None
    # Batch k+1 is tokenized on this worker (the core releases the GIL) while batch k is written
    # and batch k+2 parsed here; batches are still placed one after another in row order, so
    # commits are unchanged.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatmask-tokenize")
    in_flight: Future[Batch] | None = None

    def hand_over(batch: Batch | None) -> None:
        nonlocal in_flight, done_rows, done_tokens
        done = None if in_flight is None else in_flight.result()
        in_flight = None if batch is None else worker.submit(job.work, batch)
        if done is not None:
            tokens_before = state.tokens + job.part_tokens
            job.place(done)
            done_rows += len(done.rows)
            done_tokens += state.tokens + job.part_tokens - tokens_before
            progress.update(done_rows, done_tokens)

    try:
        pending: list[RawRow] = []
        try:
            for raw in iter_raw_rows(inputs, job.columns, opts.batch_rows, state.next_row, counter):
                rows_in = raw.row + 1
                if raw.row < state.next_row:
                    continue
                pending.append(raw)
                if len(pending) >= opts.batch_rows:
                    hand_over(job.parse(pending))
                    pending = []
        except InputReadError as e:
            read_error = e
            rows_in = e.row
        hand_over(job.parse(pending) if pending else None)
        hand_over(None)
        if read_error is None and rows_in < state.next_row:
            raise UsageError(f"--resume: the inputs hold {rows_in} rows but {state.next_row} were already done")
        rows_in = max(rows_in, state.next_row)
        state.read_error = None if read_error is None else read_error.to_json()
        job.finish(rows_in)
        if read_error is not None:  # make the read error durable even when nothing was left to commit
            sinks.write_json_atomic(os.path.join(opts.outdir, PROGRESS), state.to_json())
    except BaseException:
        if in_flight is not None:
            in_flight.cancel()
            wait([in_flight])
        worker.shutdown()
        progress.close()
        job.abort()
        raise
    worker.shutdown()
    progress.close()
    verify_output(opts.outdir, rows_in, state.parts)
    assert rows_in == state.rows_out + state.rows_failed + state.rows_dropped, (
        rows_in,
        state.rows_out,
        state.rows_failed,
        state.rows_dropped,
    )
    manifest = _manifest(opts, tokenizer, inputs, state, rows_in, complete=read_error is None)
    sinks.write_json_atomic(os.path.join(opts.outdir, MANIFEST), manifest)
    if read_error is not None:
        # progress.json stays (it records the read error): --resume continues from here.
        raise UsageError(
            f"{read_error}; the {rows_in:,} row(s) before it are committed in {opts.outdir} "
            f"(manifest.json: complete false); fix or replace the file and rerun with --resume"
        )
    os.remove(os.path.join(opts.outdir, PROGRESS))
    if not opts.quiet:
        _summary(opts, state, rows_in)
    return manifest


def _summary(opts: TokenizeOptions, state: State, rows_in: int) -> None:
    flagged = {f: n for f, n in state.preference_flags.items() if f != "pairs"}
    if flagged:
        flags = ", ".join(f"{f} {n:,}" for f, n in sorted(flagged.items()))
        print(
            f"chatmask tokenize: {state.preference_flags['pairs']:,} pair(s) flagged ({flags}); see the "
            "preference_flags column and manifest.json",
            file=sys.stderr,
        )
    wrong = state.reference_wrong.get("rows", 0)
    if wrong:
        counts = _reference_counts(state)["by_cause"]
        causes = ", ".join(f"{c} {n:,}" for c, n in counts.items() if n)
        print(
            f"chatmask tokenize: the reference's mask (mode {opts.mode}) is wrong on {wrong:,} row(s) ({causes}); "
            "they are flagged in the reference_wrong column (raises: in errors.jsonl) and counted in manifest.json",
            file=sys.stderr,
        )
    dropped = f", {state.rows_dropped:,} dropped ({DROPPED})" if opts.policy is not None else ""
    if state.rows_with_control_tokens is None:
        why = "not counted for preference pairs" if opts.task == "preference" else "Jinja2 template path"
        control = f"control tokens in inputs not checked ({why})"
    else:
        how = (
            "encoded as text"
            if opts.policy is not None and opts.policy.sanitize_control_tokens
            else "encoded as control tokens"
        )
        control = f"{state.rows_with_control_tokens:,} row(s) with control-token text ({how})"
    print(
        f"chatmask tokenize: {rows_in:,} rows in -> {state.rows_out:,} out in {len(state.parts)} part(s), "
        f"{state.rows_failed:,} failed ({ERRORS}){dropped}; {state.tokens:,} tokens "
        f"({state.trained_tokens:,} trained); {control}; {state.seconds:.2f} s -> {opts.outdir}",
        file=sys.stderr,
    )
