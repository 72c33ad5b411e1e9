"""The packing step the `datasets` and Ray Data adapters share: tokenized rows in, packs out.

A batch (a `datasets` batch or a Ray block) holds ``input_ids`` and ``labels`` list columns (and
``message_index`` under a policy), one row per conversation, as the tokenizing adapters write them.
:class:`PackStep` packs the batch's rows with :func:`chatmask.pack` and returns one row per pack:
``input_ids``, ``labels``, ``position_ids``, ``seq_lens`` (and ``message_index``). Packing is per
batch: rows of different batches never share a pack, which costs fill efficiency at each batch
edge (measured in docs/packing.md); larger batches cost less.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .batch import TokenizedBatch
from .pack import OVERFLOWS, STRATEGIES, PackedBatch, batch_from_lists, pack

COLUMNS = ("input_ids", "labels", "position_ids", "seq_lens")


def _flat(column: Any, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return values[offsets[0] : offsets[-1]], offsets - offsets[0]


class PackStep:
    """``step(batch)``: the batch's rows packed (see the module docstring). Pickles (plain options)."""

    def __init__(
        self,
        max_length: int,
        strategy: str = "bfd",
        overflow: str = "error",
        pad_to_max_length: bool = False,
        pad_id: int = 0,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        if overflow not in OVERFLOWS:
            raise ValueError(f"overflow must be one of {', '.join(OVERFLOWS)}, not {overflow!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, not {max_length!r}")
        self.max_length, self.strategy, self.overflow = max_length, strategy, overflow
        self.pad_to_max_length, self.pad_id = pad_to_max_length, pad_id

    def __repr__(self) -> str:
        return (
            f"PackStep(max_length={self.max_length}, strategy={self.strategy!r}, overflow={self.overflow!r}, "
            f"pad_to_max_length={self.pad_to_max_length})"
        )

    def _pack(self, batch: TokenizedBatch) -> PackedBatch:
        return pack(batch, self.max_length, self.strategy, self.overflow, self.pad_to_max_length, self.pad_id)

    def batch_of(self, data: Any) -> TokenizedBatch:
        """A TokenizedBatch from a pyarrow Table, a `datasets` LazyBatch or a mapping of columns."""
        table = getattr(data, "pa_table", data)  # datasets' LazyBatch wraps an Arrow table
        names = getattr(table, "column_names", None)
        if names is not None and hasattr(table, "column"):
            for name in ("input_ids", "labels"):
                if name not in names:
                    raise KeyError(f"packing needs an {name!r} column (the tokenizing map's output), not {names}")
            ids, offsets = _flat(table.column("input_ids"), np.int64)
            labels, label_offsets = _flat(table.column("labels"), np.int64)
            mi = _flat(table.column("message_index"), np.int32)[0] if "message_index" in names else None
            rows = np.arange(table.num_rows, dtype=np.int64)
            return TokenizedBatch(ids, labels, offsets, label_offsets, rows, [], message_index=mi)
        if not isinstance(data, Mapping):
            raise TypeError(f"packing takes a pyarrow Table or a mapping of columns, not {type(data).__name__}")
        mi_col = data.get("message_index")
        return batch_from_lists(data["input_ids"], data["labels"], message_index=mi_col)

    def columns(self, packed: PackedBatch) -> dict[str, list[np.ndarray]]:
        """One list entry per pack, per column."""
        cut = packed.token_offsets[1:-1]
        out = {
            "input_ids": np.split(packed.input_ids, cut),
            "labels": np.split(packed.labels, cut),
            "position_ids": np.split(packed.position_ids.astype(np.int32), cut),
            "seq_lens": np.split(packed.seq_lens.astype(np.int32), packed.pack_offsets[1:-1]),
        }
        if packed.message_index is not None:
            out["message_index"] = np.split(packed.message_index, cut)
        if not len(packed):
            out = {k: [] for k in out}
        return out

    def table(self, packed: PackedBatch) -> Any:
        table = packed.to_arrow()
        return table.drop_columns(["sequence_rows"])

    def __call__(self, batch: Any) -> Any:
        return self.columns(self._pack(self.batch_of(batch)))
