"""`TokenizedBatch`: flat numpy buffers for many rows, with views per row."""

from __future__ import annotations

from typing import Any

import numpy as np


class TokenizedBatch:
    """The output of :meth:`ChatTokenizer.tokenize_batch`.

    Row ``i`` (the ``i``-th conversation that did not fail, input row ``rows[i]``) is
    ``input_ids[offsets[i]:offsets[i+1]]`` and ``labels[label_offsets[i]:label_offsets[i+1]]``.
    Labels carry their own offsets because the reference returns more labels than tokens
    when a prefix renders longer than the whole chat; for every other row the two offset
    arrays are equal.
    """

    def __init__(
        self,
        input_ids: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        label_offsets: np.ndarray,
        rows: np.ndarray,
        errors: list[tuple[int, str]],
        control_rows: np.ndarray | None = None,
        message_index: np.ndarray | None = None,
        straddles_start: np.ndarray | None = None,
        span_methods: list[str] | None = None,
        straddling: np.ndarray | None = None,
        positions_derived: np.ndarray | None = None,
        truncated: np.ndarray | None = None,
        dropped: list[int] | None = None,
    ) -> None:
        # Under a MaskPolicy: message_index runs along input_ids; the others are per output row,
        # except `dropped` (input rows the policy's overflow="drop" removed).
        self.message_index = message_index
        # Along input_ids too: the token carries a message's index but starts before that
        # message's region (it also covers the text before it; chatmask.preference flags it).
        self.straddles_start = straddles_start
        # Per output row: an input string held a control token's text (see sanitize_control_tokens).
        self.control_rows = control_rows
        self.span_methods = span_methods
        self.straddling = straddling
        self.positions_derived = positions_derived
        self.truncated = truncated
        self.dropped = dropped if dropped is not None else []
        # tokenize_batch(..., flag_reference=True) in a reference mode: per output row, whether the
        # reference's mask is wrong on the spans and why (see chatmask.truth); None otherwise.
        self.reference_wrong: np.ndarray | None = None
        self.reference_verdicts: np.ndarray | None = None  # the core's verdict bits (chatmask.truth)
        self.reference_causes: list[str] | None = None
        self.reference_unmeasured: np.ndarray | None = None
        self.reference_raised: list[int] | None = None
        self.input_ids = input_ids
        self.labels = labels
        self.offsets = offsets
        self.label_offsets = label_offsets
        self.rows = rows
        self.errors = errors

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for a batch of {n}")
        row = {
            "input_ids": self.input_ids[self.offsets[i] : self.offsets[i + 1]],
            "labels": self.labels[self.label_offsets[i] : self.label_offsets[i + 1]],
        }
        if self.message_index is not None:
            row["message_index"] = self.message_index[self.offsets[i] : self.offsets[i + 1]]
        return row

    def __repr__(self) -> str:
        return f"TokenizedBatch(rows={len(self)}, tokens={len(self.input_ids)}, errors={len(self.errors)})"

    def to_list(self) -> list[dict[str, list[int]]]:
        """One dict per row, equal to the drop-in ``tokenize_for_trainer`` output."""
        ids = self.input_ids.tolist()
        labels = self.labels.tolist()
        off = self.offsets.tolist()
        loff = self.label_offsets.tolist()
        return [{"tokens": ids[off[i] : off[i + 1]], "masks": labels[loff[i] : loff[i + 1]]} for i in range(len(self))]

    def to_arrow(self) -> Any:
        """A pyarrow Table (``row``, ``input_ids``, ``labels``) whose list columns share the flat buffers."""
        try:
            import pyarrow as pa
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_arrow() needs pyarrow: pip install pyarrow") from e
        ids = pa.ListArray.from_arrays(pa.array(self.offsets.astype(np.int32, copy=False)), pa.array(self.input_ids))
        labels = pa.ListArray.from_arrays(
            pa.array(self.label_offsets.astype(np.int32, copy=False)), pa.array(self.labels)
        )
        return pa.table({"row": pa.array(self.rows), "input_ids": ids, "labels": labels})
