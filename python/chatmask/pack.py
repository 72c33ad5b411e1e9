"""Exact sequence packing: :func:`pack` turns a :class:`TokenizedBatch` into a :class:`PackedBatch`.

The plan (which piece of which row goes into which pack) and the gather of the flat buffers run in
the Rust core with the GIL released (``src/pack.rs``). Conventions (see ``docs/packing.md``):

* ``position_ids`` restart at 0 at every packed sequence;
* the first label of every packed sequence is ``-100`` (under the usual one-token label shift it
  would be predicted from the previous sequence's last token); no other label changes;
* ``seq_lens`` lists every packed sequence's length, pack after pack (``pack_offsets`` index it);
  with ``pad_to_max_length`` the padding is its own final entry of its pack, as torchtune counts it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _core
from .batch import TokenizedBatch

STRATEGIES = ("bfd", "ffd", "sequential")
OVERFLOWS = ("error", "drop", "truncate_left", "truncate_right", "split")
IGNORE = -100


class PackedBatch:
    """Packs of at most ``max_length`` tokens, in flat numpy buffers.

    Pack ``p`` is ``input_ids[token_offsets[p]:token_offsets[p+1]]`` (also ``labels``,
    ``position_ids`` and ``message_index``), and its sequences have the lengths
    ``seq_lens[pack_offsets[p]:pack_offsets[p+1]]``. ``sequence_rows`` runs along ``seq_lens``: the
    input row of each packed sequence (``-1`` for a padding entry). A row cut by ``overflow="split"``
    is several packed sequences with the same input row, in order.
    """

    def __init__(
        self,
        input_ids: np.ndarray,
        labels: np.ndarray,
        position_ids: np.ndarray,
        seq_lens: np.ndarray,
        pack_offsets: np.ndarray,
        token_offsets: np.ndarray,
        sequence_rows: np.ndarray,
        max_length: int,
        strategy: str,
        padded: bool,
        rows_in: int,
        rows_dropped: list[int],
        rows_truncated: list[int],
        rows_split: list[int],
        message_index: np.ndarray | None = None,
        sequence_offsets: np.ndarray | None = None,
    ) -> None:
        self.input_ids = input_ids
        self.labels = labels
        self.position_ids = position_ids
        self.seq_lens = seq_lens
        self.pack_offsets = pack_offsets
        self.token_offsets = token_offsets
        self.sequence_rows = sequence_rows
        self.message_index = message_index
        # Along seq_lens: where in its input row each packed sequence starts (0 unless the row was
        # split or truncated on the left; -1 for padding).
        self.sequence_offsets = sequence_offsets if sequence_offsets is not None else np.zeros(len(seq_lens), np.int64)
        self.max_length = max_length
        self.strategy = strategy
        self.padded = padded
        self.rows_in = rows_in
        self.rows_dropped = rows_dropped
        self.rows_truncated = rows_truncated
        self.rows_split = rows_split

    # -- sizes ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.pack_offsets) - 1

    @property
    def tokens(self) -> int:
        """Tokens of the input rows in the packs (padding not counted)."""
        return int(self.seq_lens[self.sequence_rows >= 0].sum())

    @property
    def capacity(self) -> int:
        return len(self) * self.max_length

    @property
    def efficiency(self) -> float:
        """Fill efficiency: non-pad tokens / (packs * max_length); 1.0 for no packs."""
        return self.tokens / self.capacity if len(self) else 1.0

    def stats(self) -> dict[str, Any]:
        return {
            "packs": len(self),
            "sequences": int((self.sequence_rows >= 0).sum()),
            "tokens": self.tokens,
            "capacity": self.capacity,
            "efficiency": self.efficiency,
            "rows_in": self.rows_in,
            "rows_dropped": len(self.rows_dropped),
            "rows_truncated": len(self.rows_truncated),
            "rows_split": len(self.rows_split),
        }

    def __repr__(self) -> str:
        return (
            f"PackedBatch(packs={len(self)}, max_length={self.max_length}, strategy={self.strategy!r}, "
            f"efficiency={self.efficiency:.4f})"
        )

    # -- one pack, in the trainers' conventions --------------------------------------------

    def _check(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"pack {i} out of range for {n} packs")
        return i

    def _slice(self, values: np.ndarray, i: int) -> np.ndarray:
        return values[self.token_offsets[i] : self.token_offsets[i + 1]]

    def pack_seq_lens(self, i: int) -> np.ndarray:
        i = self._check(i)
        return self.seq_lens[self.pack_offsets[i] : self.pack_offsets[i + 1]]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = self._check(i)
        row = {
            "input_ids": self._slice(self.input_ids, i),
            "labels": self._slice(self.labels, i),
            "position_ids": self._slice(self.position_ids, i),
            "seq_lens": self.pack_seq_lens(i),
        }
        if self.message_index is not None:
            row["message_index"] = self._slice(self.message_index, i)
        return row

    def cu_seqlens(self, i: int, dtype: Any = np.int32) -> np.ndarray:
        """flash-attention varlen's ``cu_seqlens`` of pack ``i``: 0 then the cumulative ``seq_lens``."""
        lens = self.pack_seq_lens(i)
        out = np.zeros(len(lens) + 1, dtype=dtype)
        np.cumsum(lens, out=out[1:])
        return out

    def attention_mask(self, i: int) -> np.ndarray:
        """LLaMA-Factory ``neat_packing``: each token's 1-based sequence index in its pack, 0 for padding."""
        i = self._check(i)
        lens = self.pack_seq_lens(i)
        real = self.sequence_rows[self.pack_offsets[i] : self.pack_offsets[i + 1]] >= 0
        index = np.where(real, np.arange(1, len(lens) + 1), 0)
        return np.repeat(index, lens).astype(np.int64)

    def flash_attn_kwargs(self, i: int) -> dict[str, Any]:
        """What ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` adds for this pack."""
        cu = self.cu_seqlens(i)
        max_len = int(self.pack_seq_lens(i).max()) if len(self.pack_seq_lens(i)) else 0
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}

    def torchtune(self, i: int) -> dict[str, np.ndarray]:
        """Pack ``i`` in torchtune ``PackedDataset``'s fields: ``tokens``, ``labels``, ``input_pos``, ``seq_lens``."""
        row = self[i]
        return {
            "tokens": row["input_ids"],
            "labels": row["labels"],
            "input_pos": row["position_ids"],
            "seq_lens": row["seq_lens"],
        }

    # -- whole batch -------------------------------------------------------------------------

    def to_arrow(self) -> Any:
        """A pyarrow Table, one row per pack: ``input_ids``, ``labels``, ``position_ids``, ``seq_lens``,
        ``sequence_rows`` (and ``message_index``), list columns over the flat buffers."""
        import pyarrow as pa

        tok = pa.array(self.token_offsets.astype(np.int32, copy=False))
        seq = pa.array(self.pack_offsets.astype(np.int32, copy=False))
        cols = {
            "input_ids": pa.ListArray.from_arrays(tok, pa.array(self.input_ids)),
            "labels": pa.ListArray.from_arrays(tok, pa.array(self.labels)),
            "position_ids": pa.ListArray.from_arrays(tok, pa.array(self.position_ids.astype(np.int32, copy=False))),
            "seq_lens": pa.ListArray.from_arrays(seq, pa.array(self.seq_lens.astype(np.int32, copy=False))),
            "sequence_rows": pa.ListArray.from_arrays(seq, pa.array(self.sequence_rows)),
        }
        if self.message_index is not None:
            cols["message_index"] = pa.ListArray.from_arrays(tok, pa.array(self.message_index))
        return pa.table(cols)


def _i64(a: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a), dtype=np.int64)


def _src(a: np.ndarray) -> np.ndarray:
    if a.dtype not in (np.int32, np.uint32, np.int64):
        a = a.astype(np.int64)
    return np.ascontiguousarray(a)


def pack(
    batch: TokenizedBatch,
    max_length: int,
    strategy: str = "bfd",
    overflow: str = "error",
    pad_to_max_length: bool = False,
    pad_id: int = 0,
) -> PackedBatch:
    """Pack the rows of ``batch`` into sequences of at most ``max_length`` tokens.

    * ``strategy``: ``"bfd"`` (best-fit decreasing, the default, as TRL), ``"ffd"`` (first-fit
      decreasing, as axolotl's multipack) or ``"sequential"`` (input order kept). All are deterministic.
    * ``overflow``: rows longer than ``max_length``: ``"error"`` (raise, naming the row), ``"drop"``,
      ``"truncate_left"``, ``"truncate_right"`` (the ``MaskPolicy`` length rules: pass
      ``policy.overflow`` to reuse the policy's), or ``"split"`` into pieces of ``max_length`` (as
      TRL's ``bfd_split``). Every drop, cut and split is listed (``rows_dropped`` ...).
    * ``pad_to_max_length``: every pack padded to ``max_length`` with ``pad_id``, labels ``-100``,
      ``position_ids`` continuing (capped at ``max_length - 1``), and the padding as its own final
      ``seq_lens`` entry (``sequence_rows`` ``-1``), as torchtune's ``PackedDataset`` does.

    Raises ``ValueError`` for bad options and for a row that cannot be packed (naming the input row).
    """
    if not isinstance(batch, TokenizedBatch):
        raise TypeError(f"pack() takes a TokenizedBatch, not {type(batch).__name__}")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, not {max_length!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow must be one of {', '.join(OVERFLOWS)}, not {overflow!r}")
    max_length = int(max_length)
    rows = _i64(batch.rows)
    plan = _core.pack_plan(_i64(batch.offsets), _i64(batch.label_offsets), rows, max_length, strategy, overflow)
    start, plen, packs = plan["piece_start"], plan["piece_len"], plan["pack_offsets"]
    pad = pad_id if pad_to_max_length else None
    ids = _core.pack_gather(_src(batch.input_ids), start, plen, packs, max_length, pad, None)
    labels = _core.pack_gather(
        _src(batch.labels), start, plen, packs, max_length, IGNORE if pad_to_max_length else None, IGNORE
    )
    positions = _core.pack_positions(plen, packs, max_length, pad_to_max_length)
    message_index = None
    if batch.message_index is not None:
        pad_mi = -1 if pad_to_max_length else None
        message_index = _core.pack_gather(_src(batch.message_index), start, plen, packs, max_length, pad_mi, None)
    n_packs = len(packs) - 1
    seq_rows = rows[plan["piece_row"]]
    seq_offsets = start - _i64(batch.offsets)[plan["piece_row"]]
    if pad_to_max_length:
        used = np.add.reduceat(plen, packs[:-1]) if len(plen) else np.zeros(0, np.int64)
        padding = max_length - used
        # One extra entry after each pack that is not full: the padding.
        extra = (padding > 0).astype(np.int64)
        pack_offsets = packs + np.concatenate([[0], np.cumsum(extra)])
        seq_lens = np.empty(int(pack_offsets[-1]), np.int64)
        sequence_rows = np.empty(len(seq_lens), np.int64)
        real = np.ones(len(seq_lens), bool)
        pad_at = pack_offsets[1:][extra > 0] - 1
        real[pad_at] = False
        seq_lens[real], seq_lens[pad_at] = plen, padding[extra > 0]
        sequence_rows[real], sequence_rows[pad_at] = seq_rows, -1
        sequence_offsets = np.empty(len(seq_lens), np.int64)
        sequence_offsets[real], sequence_offsets[pad_at] = seq_offsets, -1
        token_offsets = np.arange(n_packs + 1, dtype=np.int64) * max_length
    else:
        pack_offsets = packs
        seq_lens = plen
        sequence_rows = seq_rows
        sequence_offsets = seq_offsets
        token_offsets = (
            np.concatenate([[0], np.cumsum(np.add.reduceat(plen, packs[:-1]))]) if n_packs else np.zeros(1, np.int64)
        )
    dropped, truncated, split = (rows[plan[k]].tolist() for k in ("dropped", "truncated", "split"))
    return PackedBatch(
        ids,
        labels,
        positions,
        seq_lens,
        pack_offsets.astype(np.int64),
        token_offsets.astype(np.int64),
        sequence_rows,
        max_length,
        strategy,
        pad_to_max_length,
        len(batch),
        dropped,
        truncated,
        split,
        message_index=message_index,
        sequence_offsets=sequence_offsets,
    )


def batch_from_lists(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    rows: Sequence[int] | None = None,
    message_index: Sequence[Sequence[int]] | None = None,
) -> TokenizedBatch:
    """A :class:`TokenizedBatch` from per-row lists (what a ``datasets`` batch or a Ray block holds)."""
    lens = np.fromiter((len(x) for x in input_ids), np.int64, len(input_ids))
    label_lens = np.fromiter((len(x) for x in labels), np.int64, len(labels))
    if len(lens) != len(label_lens):
        raise ValueError(f"{len(lens)} input_ids rows but {len(label_lens)} labels rows")
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    label_offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(label_lens, out=label_offsets[1:])

    def flat(values: Sequence[Sequence[int]], dtype: Any) -> np.ndarray:
        parts = [np.asarray(v, dtype) for v in values]
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    mi = None if message_index is None else flat(message_index, np.int32)
    row_ids = np.arange(len(lens), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    return TokenizedBatch(
        flat(input_ids, np.int64), flat(labels, np.int64), offsets, label_offsets, row_ids, [], message_index=mi
    )
