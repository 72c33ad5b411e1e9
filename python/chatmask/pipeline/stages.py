"""The stages a job runs on each batch of input rows, in order.

A :class:`Stage` reads and extends a :class:`Batch`: it may turn rows into error rows or dropped
rows, and it adds output columns (Arrow arrays, one entry per output row) that it declares in
:meth:`Stage.fields`, so the part schema is the sum of the stages'. The job commits whatever the
last stage leaves. Here: :class:`ParseStage` (the one row parser, :mod:`chatmask.rows`),
:class:`TokenizeStage` (``tokenize_batch``) and :class:`FlagStage` (reference verdicts);
``--task preference`` swaps in the stages of :mod:`chatmask.pipeline.preference`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._tokenizer import ChatTokenizer
from ..io.readers import InputFile, RawRow
from ..policy import MaskPolicy
from ..rows import Fields, ParsedRow, parse, parse_lines

DROP_REASON = "longer than max_length"
_BATCH_ROW_PREFIX = re.compile(r"^(?:row \d+: )+")


@dataclass
class Batch:
    """One batch of input rows on its way through the stages."""

    rows: list[RawRow]
    parsed: list[ParsedRow] = field(default_factory=list)
    good: list[int] = field(default_factory=list)  # indices into `rows` still on their way to the output
    errors: list[tuple[int, str, int]] = field(default_factory=list)  # (row, message, source index)
    dropped: list[tuple[int, int, str | None]] = field(default_factory=list)  # (row, source index, id)
    out: list[int] = field(default_factory=list)  # indices into `rows` of the output rows, in order
    columns: dict[str, Any] = field(default_factory=dict)  # Arrow arrays along `out`
    control: np.ndarray | None = None  # per output row: its text held control-token text (None: unchecked)
    # Set by TokenizeStage for the stages after it: the rows it tokenized (in `good` order) and the result.
    conversations: list[Any] = field(default_factory=list)
    tokenized: list[int] = field(default_factory=list)  # indices into `rows` of `conversations`
    result: Any = None
    reference_raised: set[int] = field(default_factory=set)  # global rows: the reference raised, the spans work

    @property
    def end(self) -> int:
        """The global row after the batch."""
        return self.rows[-1].row + 1

    def fail(self, index: int, message: str) -> None:
        self.errors.append((self.rows[index].row, message, self.rows[index].source))

    def drop(self, index: int) -> None:
        self.dropped.append((self.rows[index].row, self.rows[index].source, self.parsed[index].id))


class Stage:
    """One step of a job. `fields` are the part columns it adds (name, Arrow type); a stage that
    writes tokens names their columns in `token_columns` / `label_columns` (for the counts)."""

    token_columns: tuple[str, ...] = ()
    label_columns: tuple[str, ...] = ()

    def count_tokens(self, table: Any) -> tuple[int, int]:
        """(tokens, trained tokens) of a part table's rows."""
        import pyarrow.compute as pc

        tokens = sum(int(pc.sum(pc.list_value_length(table.column(c))).as_py() or 0) for c in self.token_columns)
        trained = sum(
            int(pc.sum(pc.not_equal(pc.list_flatten(table.column(c)), -100)).as_py() or 0) for c in self.label_columns
        )
        return tokens, trained

    def fields(self, pa: Any) -> list[tuple[str, Any]]:
        return []

    def run(self, batch: Batch) -> None:
        raise NotImplementedError


class ParseStage(Stage):
    """Every row through :func:`chatmask.rows.parse`; rows that do not parse become error rows."""

    def __init__(self, fields: Fields, policy: MaskPolicy | None) -> None:
        self.row_fields, self.policy = fields, policy

    def run(self, batch: Batch) -> None:
        # JSONL lines go through the core's reader in one call (rows.parse_lines: exact, or Python).
        lines = {i: raw.payload for i, raw in enumerate(batch.rows) if isinstance(raw.payload, bytes)}
        from_core = dict(zip(lines, parse_lines(list(lines.values()), self.row_fields, self.policy)))
        for i, raw in enumerate(batch.rows):
            # Parquet rows were read by their Arrow types (rows rule 2): no further null stripping.
            parsed = from_core.get(i) or parse(
                raw.payload, self.row_fields, self.policy, strip_nulls=False if raw.typed else None
            )
            batch.parsed.append(parsed)
            if parsed.error is not None:
                batch.fail(i, parsed.error)
            else:
                batch.good.append(i)


class TokenizeStage(Stage):
    """The good rows through ``tokenize_batch`` in one call (row by row if the call itself fails)."""

    token_columns = ("input_ids",)
    label_columns = ("labels",)

    def __init__(self, tok: ChatTokenizer, opts: Any, inputs: list[InputFile], flag: bool = False) -> None:
        self.tok, self.opts, self.policy, self.inputs = tok, opts, opts.policy, inputs
        self.flag = flag  # judge the reference's masks in the same call (FlagStage keeps the verdicts)

    def fields(self, pa: Any) -> list[tuple[str, Any]]:
        columns = [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int64()))]
        if self.policy is not None:
            columns += [
                ("message_index", pa.list_(pa.int32())),
                ("span_method", pa.string()),
                ("truncated", pa.int32()),
            ]
        return columns

    def _call(self, rows: list[Any], finish: list[str] | str) -> Any:
        if self.policy is not None:
            return self.tok.tokenize_batch(rows, policy=self.policy, num_threads=self.opts.threads, on_error="skip")
        return self.tok.tokenize_batch(
            rows,
            mode=self.opts.mode,
            finish_reason=finish,
            num_threads=self.opts.threads,
            on_error="skip",
            flag_reference=self.flag,
        )

    def _message(self, message: str) -> str:
        # The policy's row shaping names the row by its index in the batch call: not the input row.
        return _BATCH_ROW_PREFIX.sub("", message, count=1) if self.policy is not None else message

    def _tokenize(self, good: list[ParsedRow]) -> tuple[Any, list[tuple[int, str]], list[int]]:
        """(batch, errors, dropped), indices into `good`."""
        finish: list[str] | str = [r.finish_reason or "" for r in good] if self.opts.finish_reason_field else ""
        rows = [r.conversation for r in good]
        try:
            batch = self._call(rows, finish)
            return batch, [(i, self._message(msg)) for i, msg in batch.errors], [int(i) for i in batch.dropped]
        except Exception:  # noqa: BLE001 - isolate the row that broke the batch; never lose the rest
            pass
        tables, errors, kept, dropped, raised = [], [], [], [], []
        for i, row in enumerate(rows):
            try:
                one = self._call([row], finish if isinstance(finish, str) else [finish[i]])
            except Exception as e:  # noqa: BLE001
                errors.append((i, f"{type(e).__name__}: {e}"))
                continue
            errors.extend((i, self._message(msg)) for _, msg in one.errors)
            if one.reference_raised:
                raised.append(i)
            if one.dropped:
                dropped.append(i)
            if len(one):
                tables.append(one)
                kept.append(i)
        merged = merge_batches(tables, kept, self.policy is not None, raised if self.flag else None)
        return merged, errors, dropped

    def run(self, batch: Batch) -> None:
        import pyarrow as pa

        good = batch.good
        if not good:
            return
        result, errors, dropped = self._tokenize([batch.parsed[i] for i in good])
        for local, msg in errors:
            batch.fail(good[local], msg)
        for local in dropped:
            batch.drop(good[local])
        batch.conversations = [batch.parsed[i].conversation for i in good]
        batch.tokenized = list(good)
        batch.result = result
        batch.good = []
        if not len(result):
            return
        batch.out = [good[int(j)] for j in result.rows]
        arrow = result.to_arrow()
        columns = {"input_ids": arrow.column("input_ids"), "labels": arrow.column("labels")}
        if self.policy is not None:
            columns["message_index"] = pa.ListArray.from_arrays(
                pa.array(result.offsets.astype(np.int32, copy=False)), pa.array(result.message_index)
            )
            columns["span_method"] = pa.array(result.span_methods, pa.string())
            columns["truncated"] = pa.array(np.asarray(result.truncated)).cast(pa.int32())
        batch.columns.update(columns)
        batch.control = None if result.control_rows is None else np.asarray(result.control_rows, dtype=bool)


class FlagStage(Stage):
    """Reference modes: keep the verdict on every row's mask (:mod:`chatmask.truth`; the core
    judges it while TokenizeStage labels the row, given ``flag=True``) in the columns
    ``reference_wrong`` (bool) and ``reference_causes`` (string, the causes joined by ``,``;
    ``""`` when right, null when not judged)."""

    def fields(self, pa: Any) -> list[tuple[str, Any]]:
        return [("reference_wrong", pa.bool_()), ("reference_causes", pa.string())]

    def run(self, batch: Batch) -> None:
        import pyarrow as pa

        result = batch.result
        if result is None:
            return
        for j in result.reference_raised:  # indices into batch.conversations
            batch.reference_raised.add(batch.rows[batch.tokenized[j]].row)
        if batch.out:
            causes = [None if u else c for c, u in zip(result.reference_causes, result.reference_unmeasured.tolist())]
            batch.columns["reference_wrong"] = pa.array(result.reference_wrong, pa.bool_())
            batch.columns["reference_causes"] = pa.array(causes, pa.string())


def merge_batches(batches: list[Any], kept: list[int], policy: bool = False, raised: list[int] | None = None) -> Any:
    """Single-row TokenizedBatches glued into one (only for the row-by-row fallback); `raised`
    (flagged batches): the rows whose reference raised where the spans work."""
    from ..batch import TokenizedBatch
    from ..truth import attach_verdicts

    def cat(name: str, dtype: Any) -> np.ndarray:
        return np.concatenate([getattr(b, name) for b in batches]) if batches else np.zeros(0, dtype)

    ids = cat("input_ids", np.int32)
    labels = cat("labels", np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(b.input_ids) for b in batches], dtype=np.int64)]).astype(np.int64)
    loffsets = np.concatenate([[0], np.cumsum([len(b.labels) for b in batches], dtype=np.int64)]).astype(np.int64)
    control = cat("control_rows", bool) if all(b.control_rows is not None for b in batches) else None
    extra: dict[str, Any] = {}
    if policy:
        extra = {
            "message_index": cat("message_index", np.int32),
            "straddles_start": cat("straddles_start", bool),
            "span_methods": [m for b in batches for m in b.span_methods],
            "straddling": cat("straddling", np.uint32),
            "positions_derived": cat("positions_derived", bool),
            "truncated": cat("truncated", np.uint32),
        }
    merged = TokenizedBatch(ids, labels, offsets, loffsets, np.array(kept, np.int64), [], control_rows=control, **extra)
    if raised is not None:
        attach_verdicts(merged, cat("reference_verdicts", np.uint8), raised)
    return merged
