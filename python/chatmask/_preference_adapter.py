"""The preference task of the `datasets` and Ray Data adapters: columns of DPO-style rows in
(``prompt`` / ``chosen`` / ``rejected``, the policy's tools and system columns), one pair per
input row out, computed by :meth:`ChatTokenizer.tokenize_preference_batch`.

Rows are read as ``chatmask tokenize --task preference`` reads them
(:func:`chatmask.rows.parse_preference_row`, the one null rule), and the output columns are the
CLI's: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (int32),
``chosen_labels``, ``rejected_labels`` (int64, -100 masked) and ``preference_flags`` (strings,
empty when the pair is exact and consistent), plus ``dropped`` under ``overflow="drop"`` and
``error`` with ``on_error="mark"``. A failed or dropped row keeps empty lists, so rows stay one
to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ._adapter import AdapterRows, list_array, name_row, require_columns, spread
from ._tokenizer import EncoderChoice
from .errors import ChatMaskError, ConversationTypeError
from .preference import FIELDS, FLAGS_COLUMN, PREFERENCE_POLICY
from .rows import parse_preference_row, preference_columns, read_column

_OFFSETS = {
    "prompt_input_ids": "prompt",
    "chosen_input_ids": "chosen",
    "rejected_input_ids": "rejected",
    "chosen_labels": "chosen",
    "rejected_labels": "rejected",
}


@dataclass
class PreferenceColumns:
    """One entry per input row: ``values[name][offsets[side][i]:offsets[side][i+1]]`` for each of
    the five token columns (`side` is ``prompt``, ``chosen`` or ``rejected``); a failed or dropped
    row has no tokens and no flags."""

    values: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]
    flags: list[list[str]]
    errors: list[str]
    dropped: np.ndarray

    def _rows(self, name: str) -> list[np.ndarray]:
        values, off = self.values[name], self.offsets[_OFFSETS[name]].tolist()
        return [values[off[i] : off[i + 1]] for i in range(len(self.flags))]

    def output_columns(self, policy: Any, on_error: str) -> dict[str, Any]:
        result: dict[str, Any] = {name: self._rows(name) for name in FIELDS}
        # As numpy str arrays: `datasets` types a column from its first batch, and plain empty
        # lists would make it list<null>, which a later batch's flag cannot be cast to.
        result[FLAGS_COLUMN] = [np.array(flags, dtype=np.str_) for flags in self.flags]
        return {**result, **self._optional(policy, on_error)}

    def arrow_columns(self, pa: Any, policy: Any, on_error: str) -> dict[str, Any]:
        result: dict[str, Any] = {
            name: list_array(pa, self.offsets[_OFFSETS[name]], self.values[name]) for name in FIELDS
        }
        result[FLAGS_COLUMN] = pa.array(self.flags, type=pa.list_(pa.string()))
        for name, values in self._optional(policy, on_error).items():
            result[name] = pa.array(values, type=pa.bool_() if name == "dropped" else pa.string())
        return result

    def _optional(self, policy: Any, on_error: str) -> dict[str, Any]:
        """``dropped`` under ``overflow="drop"``, ``error`` with ``on_error="mark"``."""
        out: dict[str, Any] = {}
        if policy.overflow == "drop":
            out["dropped"] = self.dropped
        if on_error == "mark":
            out["error"] = self.errors
        return out


class PreferenceRows(AdapterRows):
    """The configuration of a preference adapter and the call for one batch of columns."""

    factory = "preference_fn"

    def __init__(
        self,
        tokenizer: Any,
        *,
        policy: Any = None,
        on_error: str = "raise",
        num_threads: int | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        encoder: EncoderChoice | None = None,
    ) -> None:
        from .policy import MaskPolicy

        if policy is not None and not isinstance(policy, MaskPolicy):
            raise TypeError(f"policy must be a chatmask.MaskPolicy or None, not {type(policy).__name__}")
        super().__init__(tokenizer, on_error, num_threads, template_kwargs, encoder)
        self.policy = policy or PREFERENCE_POLICY

    def consumed_columns(self) -> list[str]:
        return [c for c in preference_columns(self.policy) if c != "id"]

    def required_columns(self) -> list[str]:
        return ["chosen", "rejected"]

    def input_columns(self) -> list[str]:
        return preference_columns(self.policy)

    def output_names(self) -> list[str]:
        return [*FIELDS, FLAGS_COLUMN, "dropped", "error"]

    def describe(self) -> str:
        return f"policy={self.policy!r}, on_error={self.on_error!r}"

    def tokenize(
        self,
        columns: Mapping[str, Sequence[Any]],
        indices: Sequence[int] | None = None,
        id_column: str | None = "id",
        types: Mapping[str, Any] | None = None,
        decode_json: bool = False,
    ) -> PreferenceColumns:
        """Tokenize a batch of preference rows given as columns (arguments as
        :meth:`chatmask._adapter.RowTokenizer.tokenize`)."""
        require_columns(columns, self.required_columns())
        n = len(columns["chosen"])
        read = {
            name: columns[name] if types is None else read_column(columns[name], types.get(name), decode_json)
            for name in self.consumed_columns()
            if name in columns
        }
        rows: list[Any] = []
        good: list[int] = []
        errors = [""] * n
        for i in range(n):
            payload = {name: values[i] for name, values in read.items()}
            # Typed columns already lost their struct nulls (rule 2); untyped dicts lose every null key.
            parsed = parse_preference_row(payload, self.policy, strip_nulls=None if types is None else False)
            if parsed.error is not None:
                if self.on_error == "raise":
                    raise name_row(ConversationTypeError(), parsed.error, i, indices, columns, id_column)
                errors[i] = parsed.error
                continue
            rows.append(parsed.conversation)
            good.append(i)
        try:
            batch = self.tokenizer.tokenize_preference_batch(
                rows,
                self.policy,
                num_threads=self.num_threads,
                on_error="raise" if self.on_error == "raise" else "skip",
                **self.template_kwargs,
            )
        except ChatMaskError as e:
            if e.row is None or not 0 <= e.row < len(good):
                raise
            raise name_row(e, str(e).removeprefix(f"row {e.row}: "), good[e.row], indices, columns, id_column)
        for j, message in batch.errors:
            errors[good[j]] = message
        good_arr = np.asarray(good, dtype=np.int64)
        done = good_arr[batch.rows] if len(batch.rows) else np.zeros(0, dtype=np.int64)
        flags: list[list[str]] = [[] for _ in range(n)]
        for k, i in enumerate(done.tolist()):
            flags[i] = batch.flags[k]
        dropped = np.zeros(n, dtype=bool)
        if batch.dropped:
            dropped[good_arr[np.asarray(batch.dropped, dtype=np.int64)]] = True
        return PreferenceColumns(
            values={name: getattr(batch, name) for name in FIELDS},
            offsets={
                side: spread(getattr(batch, f"{side}_offsets"), done, n) for side in ("prompt", "chosen", "rejected")
            },
            flags=flags,
            errors=errors,
            dropped=dropped,
        )
