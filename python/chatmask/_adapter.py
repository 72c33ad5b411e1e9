"""What the `datasets` and Ray Data adapters share: columns of rows in, per-row token arrays out.

A batch arrives as columns (a mapping of column name to one value per row). Each row is read
the way ``chatmask tokenize`` reads a Parquet row: by :mod:`chatmask.rows` and its one null rule
(struct fields lose null-valued keys by Arrow type, JSON-typed values and a ``tools`` JSON
string keep theirs; without types every dict of the messages is treated as a struct).
The good rows go through :meth:`ChatTokenizer.tokenize_batch` in one call; the result has
exactly one entry per input row, in order.

With a :class:`chatmask.MaskPolicy`, the policy's ``field_messages`` / ``field_tools`` /
``field_system`` name the columns, each row goes to ``tokenize_batch(policy=...)`` keyed by
them (the policy maps roles and properties, ShareGPT's ``from``/``value`` included), and the
result also has ``message_index`` (per token), ``span_method`` and ``truncated`` (per row) and,
under ``overflow="drop"``, which rows the policy dropped (they keep empty lists).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ._tokenizer import MODES, ChatTokenizer, EncoderChoice
from .errors import ChatMaskError, ConversationTypeError
from .policy import MaskPolicy
from .rows import parse_policy_row, parse_row, read_column

ON_ERROR = ("raise", "mark")
INT32_MAX = 2**31 - 1


def resolve_tokenizer(tokenizer: Any, encoder: EncoderChoice | None = None) -> ChatTokenizer:
    """A `ChatTokenizer`, a local tokenizer directory, or a transformers fast tokenizer.

    `encoder` chooses the engine for the last two (default ``"auto"``); a `ChatTokenizer` already
    carries its own, so giving one with it is refused rather than ignored."""
    if isinstance(tokenizer, ChatTokenizer):
        if encoder is not None:
            raise ValueError(
                "encoder= applies to a tokenizer path or a transformers tokenizer; build the ChatTokenizer with encoder= instead"
            )
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return ChatTokenizer.from_pretrained(tokenizer, encoder=encoder or "auto")
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        return ChatTokenizer.from_transformers(tokenizer, encoder=encoder or "auto")
    raise TypeError(
        "tokenizer must be a chatmask.ChatTokenizer, a local tokenizer directory or a transformers fast "
        f"tokenizer, not {type(tokenizer).__name__}"
    )


@dataclass
class TokenizedColumns:
    """One entry per input row: row ``i`` is ``input_ids[offsets[i]:offsets[i+1]]`` (and labels
    with ``label_offsets``); a failed row (``errors[i] != ""``, only with ``on_error="mark"``)
    has no tokens."""

    input_ids: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    label_offsets: np.ndarray
    errors: list[str]
    # Under a policy: message_index along input_ids (same offsets); per row the span method
    # ("" for a row without tokens), the tokens truncated, and whether the policy dropped it.
    message_index: np.ndarray | None = None
    span_method: list[str] | None = None
    truncated: np.ndarray | None = None
    dropped: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def id_rows(self) -> list[np.ndarray]:
        ids, off = self.input_ids, self.offsets.tolist()
        return [ids[off[i] : off[i + 1]] for i in range(len(self))]

    def message_index_rows(self) -> list[np.ndarray]:
        assert self.message_index is not None, "message_index exists only under a policy"
        index, off = self.message_index, self.offsets.tolist()
        return [index[off[i] : off[i + 1]] for i in range(len(self))]

    def label_rows(self) -> list[np.ndarray]:
        labels, off = self.labels, self.label_offsets.tolist()
        return [labels[off[i] : off[i + 1]] for i in range(len(self))]

    def output_columns(self, policy: Any, on_error: str) -> dict[str, Any]:
        """The columns both adapters add: ids and labels, the policy's, and ``error`` when marked."""
        result: dict[str, Any] = {"input_ids": self.id_rows(), "labels": self.label_rows()}
        if policy is not None:
            result["message_index"] = self.message_index_rows()
            result["span_method"] = self.span_method
            result["truncated"] = self.truncated
            if policy.overflow == "drop":
                result["dropped"] = self.dropped
        if on_error == "mark":
            result["error"] = self.errors
        return result

    def arrow_columns(self, pa: Any, policy: Any, on_error: str) -> dict[str, Any]:
        """:meth:`output_columns` as pyarrow arrays over the flat buffers (no per-row copies)."""
        result: dict[str, Any] = {
            "input_ids": list_array(pa, self.offsets, self.input_ids),
            "labels": list_array(pa, self.label_offsets, self.labels),
        }
        if policy is not None:
            assert self.message_index is not None
            result["message_index"] = list_array(pa, self.offsets, self.message_index)
            result["span_method"] = pa.array(self.span_method, type=pa.string())
            result["truncated"] = pa.array(self.truncated, type=pa.int32())
            if policy.overflow == "drop":
                result["dropped"] = pa.array(self.dropped, type=pa.bool_())
        if on_error == "mark":
            result["error"] = pa.array(self.errors, type=pa.string())
        return result


_ROW_PREFIX = re.compile(r"^row (\d+): (?:row \d+: )*")  # tokenize_batch(policy) may name the row twice


class AdapterRows:
    """What every adapter task configures: the tokenizer, the error mode, threads, template
    arguments (checked here, once)."""

    factory = ""  # the chatmask.datasets function that builds it (for repr)

    def __init__(
        self,
        tokenizer: Any,
        on_error: str,
        num_threads: int | None,
        template_kwargs: Mapping[str, Any] | None,
        encoder: EncoderChoice | None,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be 'raise' or 'mark', not {on_error!r}")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ValueError(f"num_threads must be a positive int or None, not {num_threads!r}")
        self.tokenizer = resolve_tokenizer(tokenizer, encoder)
        self.on_error = on_error
        self.num_threads = num_threads
        self.template_kwargs = dict(template_kwargs or {})


class RowTokenizer(AdapterRows):
    """The configuration of an adapter and the call that tokenizes one batch of columns."""

    factory = "map_fn"

    def __init__(
        self,
        tokenizer: Any,
        mode: str | None = None,
        *,
        messages_field: str | None = None,
        tools_field: str | None = None,
        finish_reason_field: str | None = None,
        on_error: str = "raise",
        num_threads: int | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
        policy: MaskPolicy | None = None,
        encoder: EncoderChoice | None = None,
    ) -> None:
        """`mode`, `messages_field` and `tools_field` default (None) to ``last``, ``messages`` and
        ``tools``; with a `policy` they (and `finish_reason_field`) must not be given: the policy
        decides the labels and its ``field_*`` name the columns."""
        if policy is not None:
            if not isinstance(policy, MaskPolicy):
                raise TypeError(f"policy must be a chatmask.MaskPolicy or None, not {type(policy).__name__}")
            given = [
                name
                for name, value in (
                    ("mode", mode),
                    ("finish_reason_field", finish_reason_field),
                    ("messages_field", messages_field),
                    ("tools_field", tools_field),
                )
                if value is not None
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)} cannot be combined with policy: the policy decides the labels, and its "
                    "field_messages / field_tools / field_system name the columns"
                )
            messages_field, tools_field = policy.field_messages, policy.field_tools
        else:
            mode = "last" if mode is None else mode
            if mode not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
            messages_field = "messages" if messages_field is None else messages_field
            tools_field = "tools" if tools_field is None else tools_field
        super().__init__(tokenizer, on_error, num_threads, template_kwargs, encoder)
        self.policy = policy
        self.mode = mode
        self.messages_field = messages_field
        self.tools_field = tools_field
        self.system_field = None if policy is None else policy.field_system
        self.finish_reason_field = finish_reason_field

    def tokenize(
        self,
        columns: Mapping[str, Sequence[Any]],
        indices: Sequence[int] | None = None,
        id_column: str | None = "id",
        types: Mapping[str, Any] | None = None,
        decode_json: bool = False,
    ) -> TokenizedColumns:
        """Tokenize a batch given as columns.

        `indices` are the rows' positions in the whole dataset, when known (they name a failing
        row); the `id_column` (if the batch has it) is read only to name a failing row. `types`
        are the columns' Arrow types when known: then only struct fields lose their null-valued
        keys (and JSON-typed values are parsed if `decode_json`, see :func:`value_reader`);
        without them every null-valued key of the messages and tools is dropped.
        """
        require_columns(columns, self.required_columns())
        messages = columns[self.messages_field]
        n = len(messages)
        if n and isinstance(messages[0], Mapping):
            raise TypeError(
                f"column {self.messages_field!r} holds single messages, not conversations: "
                "use ds.map(..., batched=True)"
            )
        tools = columns[self.tools_field] if self.tools_field in columns else None
        system = columns[self.system_field] if self.system_field is not None and self.system_field in columns else None
        if types is not None:
            messages = read_column(messages, types.get(self.messages_field), decode_json)
            tools = None if tools is None else read_column(tools, types.get(self.tools_field), decode_json)
        finish = columns[self.finish_reason_field] if self.finish_reason_field is not None else None
        policy = self.policy

        conversations: list[Any] = []
        finish_reasons: list[str | None] = []
        good: list[int] = []
        errors = [""] * n
        for i in range(n):
            payload: dict[str, Any] = {self.messages_field: messages[i]}
            if tools is not None:
                payload[self.tools_field] = tools[i]
            if finish is not None:
                payload[self.finish_reason_field] = finish[i]  # type: ignore[index]
            if policy is not None:
                if system is not None:
                    payload[self.system_field] = system[i]  # type: ignore[index]
                # (`types` known: struct nulls are already gone; unknown: drop every null key.)
                parsed = parse_policy_row(payload, policy, strip_nulls=types is None)
            else:
                parsed = parse_row(
                    payload,
                    self.messages_field,
                    self.tools_field,
                    self.finish_reason_field,
                    strip_nulls=None if types is None else False,
                )
            if parsed.error is not None:
                if self.on_error == "raise":
                    raise name_row(ConversationTypeError(), parsed.error, i, indices, columns, id_column)
                errors[i] = parsed.error
                continue
            conversations.append(parsed.conversation)
            finish_reasons.append(parsed.finish_reason)
            good.append(i)

        if policy is not None:
            label_kwargs: dict[str, Any] = {"policy": policy}
        else:
            label_kwargs = {"mode": self.mode, "finish_reason": finish_reasons if finish is not None else ""}
        try:
            batch = self.tokenizer.tokenize_batch(
                conversations,
                num_threads=self.num_threads,
                on_error="raise" if self.on_error == "raise" else "skip",
                ids_dtype="int32",
                **label_kwargs,
                **self.template_kwargs,
            )
        except ChatMaskError as e:
            if e.row is None:
                # The policy's row shaping names the row only in its message ("row 3: ...").
                match = _ROW_PREFIX.match(str(e))
                if match is not None:
                    e.row = int(match.group(1))
            if e.row is None or not 0 <= e.row < len(good):
                raise
            raise name_row(e, _ROW_PREFIX.sub("", str(e), count=1), good[e.row], indices, columns, id_column)
        good_arr = np.asarray(good, dtype=np.int64)
        for j, message in batch.errors:
            # Under a policy, shaping errors start with "row <index in the call>: ", which names no
            # row of the dataset; the error column is per row anyway.
            errors[good[j]] = _ROW_PREFIX.sub("", message, count=1) if policy is not None else message
        done = good_arr[batch.rows] if len(batch.rows) else np.zeros(0, dtype=np.int64)
        offsets = spread(batch.offsets, done, n)
        out = TokenizedColumns(
            input_ids=batch.input_ids,
            offsets=offsets,
            labels=batch.labels,
            label_offsets=spread(batch.label_offsets, done, n),
            errors=errors,
        )
        if policy is not None:
            # "" (not None) for a row without tokens: `datasets` types a column from its first
            # batch and refuses to write one whose first values were all None.
            span_method: list[str] = [""] * n
            assert batch.span_methods is not None
            for k, i in enumerate(done.tolist()):
                span_method[i] = batch.span_methods[k]
            truncated = np.zeros(n, dtype=np.int32)
            truncated[done] = np.asarray(batch.truncated, dtype=np.int64)
            dropped = np.zeros(n, dtype=bool)
            if batch.dropped:
                dropped[good_arr[np.asarray(batch.dropped, dtype=np.int64)]] = True
            out.message_index = np.asarray(batch.message_index, dtype=np.int32)
            out.span_method = span_method
            out.truncated = truncated
            out.dropped = dropped
        return out

    def output_names(self) -> list[str]:
        """The columns :meth:`TokenizedColumns.output_columns` can add (``error`` only when marked)."""
        names = ["input_ids", "labels"]
        if self.policy is not None:
            names += ["message_index", "span_method", "truncated"]
            names += ["dropped"] if self.policy.overflow == "drop" else []
        return names + ["error"]

    def consumed_columns(self) -> list[str]:
        """The input columns the rows are built from (an adapter drops them by default)."""
        return [n for n in (self.messages_field, self.tools_field, self.system_field) if n]

    def required_columns(self) -> list[str]:
        return [n for n in (self.messages_field, self.finish_reason_field) if n]

    def input_columns(self) -> list[str]:
        """Every column :meth:`tokenize` reads (the ``id`` column only to name a failing row)."""
        return list(dict.fromkeys([*self.consumed_columns(), *self.required_columns(), "id"]))

    def describe(self) -> str:
        if self.policy is not None:
            return f"policy={self.policy!r}, on_error={self.on_error!r}"
        return f"mode={self.mode!r}, messages_field={self.messages_field!r}, on_error={self.on_error!r}"


def where(i: int, indices: Sequence[int] | None, columns: Mapping[str, Sequence[Any]], id_column: str | None) -> str:
    """How an error names row `i` of a batch: its dataset row when known, its ``id`` if it has one."""
    row_id = ""
    if id_column is not None and id_column in columns:
        value = columns[id_column][i]
        if value is not None:
            row_id = f", id {value!r}"
    if indices is not None:
        return f"dataset row {int(indices[i])} (row {i} of the batch{row_id}): "
    return f"row {i} of the batch{row_id}: "


def spread(offsets: np.ndarray, done: np.ndarray, n: int) -> np.ndarray:
    """Offsets over all `n` input rows from offsets over the rows in `done` (the others empty)."""
    lengths = np.zeros(n, dtype=np.int64)
    lengths[done] = np.diff(offsets)
    out = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def list_array(pa: Any, offsets: np.ndarray, values: np.ndarray) -> Any:
    """A list array over `values` without copying them (large_list past 2**31 - 1 values)."""
    if int(offsets[-1]) > INT32_MAX:
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def name_row(
    error: ChatMaskError,
    message: str,
    i: int,
    indices: Sequence[int] | None,
    columns: Mapping[str, Sequence[Any]],
    id_column: str | None,
) -> ChatMaskError:
    """`error` reworded to name row `i` of the batch (:func:`where`), with ``row`` (the dataset row
    when `indices` are known) and ``batch_row`` set."""
    error.args = (where(i, indices, columns, id_column) + message,)
    error.row = int(indices[i]) if indices is not None else i
    error.batch_row = i  # type: ignore[attr-defined]
    return error


def require_columns(columns: Mapping[str, Any] | Sequence[str], names: Sequence[str]) -> None:
    for name in names:
        if name not in columns:
            raise KeyError(f"the batch has no column {name!r} (columns: {', '.join(map(str, columns))})")
