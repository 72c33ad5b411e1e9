"""``chatmask tokenize --pack MAX_LEN``: the packing sink option.

The tokenized output rows of consecutive batches gather in a **window**; once the window spans at
least ``--pack-window`` input rows (it closes at a batch end) it is packed in one
:func:`chatmask.pack` call, written as one part, and committed with the commit point at the window's
end. Nothing of a window is written before it is packed, so no commit ever passes a row that sits
in an unwritten pack: a crash loses the open window, and ``--resume`` redoes it from the commit
point (:mod:`chatmask.pipeline.state`).

* **Memory**: the window's rows (``--pack-window`` input rows plus at most one batch) are held as
  Arrow tables: about ``rows x mean tokens x 12`` bytes (16 under a policy, with message_index),
  twice that while the packs are built.
* **Part columns**: ``input_ids`` list<int32>, ``labels`` list<int64> (-100 at the first token of
  every packed sequence), ``position_ids`` list<int32>, ``seq_lens`` list<int32>, ``rows``
  list<int64> (the input row of each packed sequence, -1 for padding) and, under a policy,
  ``message_index`` list<int32> (-1 for padding). One part row is one pack.
* **Rows that cannot be packed** (reference modes: labels that do not run along the tokens) go to
  errors.jsonl, so every input row is still in exactly one place.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..batch import TokenizedBatch
from ..io.sinks import PartWriter
from ..pack import pack

UNPACKABLE = "its labels do not run along its tokens; such a row cannot be packed"


def pack_config(opts: Any) -> dict[str, Any] | None:
    """The pack options (in the resume fingerprint and the manifest); None without --pack."""
    if opts.pack is None:
        return None
    return {
        "max_length": opts.pack,
        "strategy": opts.pack_strategy,
        "overflow": opts.pack_overflow,
        "pad": opts.pad,
        "pad_id": opts.pad_id,
        "window_rows": opts.pack_window,
    }


def pack_schema(pa: Any, policy: bool) -> Any:
    ints = pa.list_(pa.int32())
    fields = [
        ("input_ids", ints),
        ("labels", pa.list_(pa.int64())),
        ("position_ids", ints),
        ("seq_lens", ints),
        ("rows", pa.list_(pa.int64())),
    ]
    if policy:
        fields.append(("message_index", ints))
    return pa.schema(fields)


def pack_manifest(opts: Any, state: Any) -> dict[str, Any] | None:
    config = pack_config(opts)
    if config is None:
        return None
    counts = state.pack
    capacity = counts.get("capacity", 0)
    return {
        **config,
        "packs": counts.get("packs", 0),
        "tokens": counts.get("tokens", 0),
        "capacity": capacity,
        "efficiency": round(counts.get("tokens", 0) / capacity, 6) if capacity else None,
        "rows_split": counts.get("rows_split", 0),
        "rows_truncated": counts.get("rows_truncated", 0),
        "rows_unpackable": counts.get("rows_unpackable", 0),
    }


def _flat(column: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


class PackSink:
    """Collects a job's output rows into windows and writes each window as one part of packs."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self.opts = job.opts
        self.schema = pack_schema(job.pa, job.policy is not None)
        self.sources = {f.name: i for i, f in enumerate(job.inputs)}
        self._reset(job.state.next_row)

    def _reset(self, start: int) -> None:
        self.start = self.end = start
        self.tables: list[Any] = []
        self.controls: list[np.ndarray | None] = []
        self.errors: list[tuple[int, str, int]] = []
        self.dropped: list[tuple[int, int, str | None]] = []

    def add(self, table: Any, control: np.ndarray | None, errors: list, dropped: list, batch_end: int) -> None:
        if table is not None and table.num_rows:
            self.tables.append(table)
            self.controls.append(control)
        self.errors += errors
        self.dropped += dropped
        self.end = batch_end
        if self.end - self.start >= self.opts.pack_window:
            self.flush()

    def flush(self) -> None:
        """Pack the window, write it as one part with its side-file lines, commit at its end."""
        job = self.job
        if self.end <= job.state.next_row and not self.tables and not self.errors and not self.dropped:
            return
        if self.tables:
            self._write_packs()
        job._write_errors(sorted(self.errors))
        job._write_dropped(sorted(self.dropped))
        job._commit(self.end)
        job.raised_rows = set()
        self._reset(self.end)

    def _write_packs(self) -> None:
        job, pa, pc = self.job, self.job.pa, self.job.pc
        table = pa.concat_tables(self.tables)
        known = [c for c in self.controls if c is not None]
        controls: np.ndarray | None = np.concatenate(known) if len(known) == len(self.controls) else None
        fits = pc.equal(pc.list_value_length(table.column("input_ids")), pc.list_value_length(table.column("labels")))
        bad = np.flatnonzero(~fits.to_numpy(zero_copy_only=False))
        if len(bad):
            rows, names = table.column("row").to_pylist(), table.column("source_file").to_pylist()
            self.errors += [(rows[i], UNPACKABLE, self.sources[names[i]]) for i in bad]
            job.part_pack["rows_unpackable"] = job.part_pack.get("rows_unpackable", 0) + len(bad)
            table = table.filter(fits)
            controls = None if controls is None else np.delete(controls, bad)
        if not table.num_rows:
            return
        job._count_rows(table, controls)
        ids, offsets = _flat(table.column("input_ids"), np.int32)
        labels, _ = _flat(table.column("labels"), np.int64)
        message_index = _flat(table.column("message_index"), np.int32)[0] if job.policy is not None else None
        rows = table.column("row").to_numpy()
        batch = TokenizedBatch(ids, labels, offsets, offsets, rows, [], message_index=message_index)
        opts = self.opts
        packed = pack(batch, opts.pack, opts.pack_strategy, opts.pack_overflow, opts.pad, opts.pad_id)
        out = packed.to_arrow().rename_columns(
            ["rows" if n == "sequence_rows" else n for n in packed.to_arrow().column_names]
        )
        out = pa.table({name: out.column(name) for name in self.schema.names}).cast(self.schema)
        job.writer = PartWriter(job.out, len(job.state.parts), self.schema)
        job.writer.write(out)
        job.part_rows += table.num_rows
        job.part_tokens += packed.tokens
        job.part_trained += int(np.count_nonzero(packed.labels != -100))
        for key, value in (
            ("packs", len(packed)),
            ("tokens", packed.tokens),
            ("capacity", packed.capacity),
            ("rows_split", len(packed.rows_split)),
            ("rows_truncated", len(packed.rows_truncated)),
        ):
            job.part_pack[key] = job.part_pack.get(key, 0) + value
