"""Hugging Face `datasets` adapter: a batched map function.

    import chatmask.datasets
    ds = ds.map(chatmask.datasets.map_fn(tok, mode="all"), batched=True, remove_columns=ds.column_names)

The function adds ``input_ids`` (``List(int32)``) and ``labels`` (``List(int64)``, ``-100`` where
masked), one row per input row, computed by :meth:`ChatTokenizer.tokenize_batch` (the Rust batch
engine). It pickles (the tokenizer travels as the files or parts it was built from), so it works
with ``num_proc``, and it pickles the same way every time, so `datasets` can fingerprint it and
reuse its cache. This module does not import `datasets`.

With ``policy=chatmask.MaskPolicy(...)`` the rows are read and labelled as
``tokenize_batch(policy=...)`` does, and the function also adds ``message_index``
(``List(int32)``, along ``input_ids``), ``span_method`` (string) and ``truncated`` (int32), and
``dropped`` (bool) when the policy's ``overflow`` is ``"drop"``.

Preference pairs (DPO rows, ``prompt`` / ``chosen`` / ``rejected``), one pair per row::

    ds = ds.map(chatmask.datasets.preference_fn(tok), batched=True)

Packing (fewer rows out than in, so the input columns must go)::

    ds = ds.map(chatmask.datasets.pack_fn(4096), batched=True, batch_size=10_000, remove_columns=ds.column_names)

gives one row per pack: ``input_ids``, ``labels`` (-100 at each packed sequence's first token),
``position_ids``, ``seq_lens`` (and ``message_index``). Rows of different map batches never share a
pack: a larger ``batch_size`` fills better (see docs/packing.md).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ._adapter import RowTokenizer
from ._pack_adapter import PackStep
from ._preference_adapter import PreferenceRows
from ._tokenizer import EncoderChoice
from .policy import MaskPolicy


class MapFn:
    """The callable :func:`map_fn` returns: ``fn(batch)`` or, with ``with_indices=True``,
    ``fn(batch, indices)``, returning ``{"input_ids", "labels"}`` (plus the policy's columns
    with a policy, and ``"error"`` with ``on_error="mark"``) as lists with one numpy array (or
    string) per row."""

    def __init__(self, rows: RowTokenizer | PreferenceRows) -> None:
        from . import __version__

        self.rows = rows
        # Part of the pickle, so a new chatmask version gets a new `datasets` fingerprint.
        self.chatmask_version = __version__

    def __call__(
        self, batch: Mapping[str, Sequence[Any]], indices: Sequence[int] | None = None
    ) -> dict[str, list[Any]]:
        if indices is not None and not isinstance(indices, Sequence):
            if isinstance(indices, int):
                raise TypeError("chatmask.datasets.map_fn needs ds.map(..., batched=True)")
            indices = list(indices)
        out = self.rows.tokenize(batch, indices=indices, types=_arrow_types(batch))
        return out.output_columns(self.rows.policy, self.rows.on_error)

    def __repr__(self) -> str:
        return f"chatmask.datasets.{self.rows.factory}({self.rows.describe()})"


def _arrow_types(batch: Any) -> dict[str, Any] | None:
    """The Arrow types of the batch's columns: `datasets` hands `map` a LazyBatch over an Arrow table."""
    table = getattr(batch, "pa_table", None)
    schema = getattr(table, "schema", None)
    if schema is None:
        return None
    return {name: schema.field(name).type for name in schema.names}


def map_fn(
    tokenizer: Any,
    mode: str | None = None,
    *,
    messages_field: str | None = None,
    tools_field: str | None = None,
    finish_reason_field: str | None = None,
    on_error: str = "raise",
    num_threads: int | None = None,
    policy: MaskPolicy | None = None,
    encoder: EncoderChoice | None = None,
    **template_kwargs: Any,
) -> MapFn:
    """A function for ``ds.map(fn, batched=True)`` that tokenizes and labels each row's conversation.

    * `tokenizer`: a :class:`chatmask.ChatTokenizer`, a local tokenizer directory, or a
      transformers fast tokenizer (converted once, here).
    * `mode`: ``last`` (default), ``all``, ``multistep`` or ``generation``, as in ``tokenize_batch``.
    * `messages_field` / `tools_field`: the columns holding the messages (default ``messages``)
      and (optional) tools (default ``tools``); a tools value that is a JSON string is parsed.
      `finish_reason_field`: a column of finish reasons (``"length"`` drops a trailing eos), or None.
    * `policy`: a :class:`chatmask.MaskPolicy`: rows are read and labelled as
      ``tokenize_batch(policy=...)`` does, and the output also has ``message_index``
      (``List(int32)``, -1 for template text), ``span_method`` (string; ``""`` for a row without
      tokens, failed or dropped) and ``truncated`` (int32), plus ``dropped`` (bool) when ``overflow="drop"``: a
      dropped row keeps empty ``input_ids`` / ``labels``, so rows stay one to one (filter them
      with ``ds.filter(lambda r: not r["dropped"])``). The policy's ``field_messages`` /
      ``field_tools`` / ``field_system`` name the columns, so `mode`, `messages_field`,
      `tools_field` and `finish_reason_field` cannot be given with it. The policy is part of
      the function's pickle, so it is part of the `datasets` fingerprint.
    * `on_error`: ``"raise"`` (default) raises the first failing row's
      :class:`chatmask.ChatMaskError`, its message naming the row: the dataset row with
      ``ds.map(..., with_indices=True)``, else the row within the batch (``exc.row``;
      ``exc.batch_row`` is always the row within the batch), plus its ``id`` column if there is
      one. ``"mark"`` keeps every row: a failing row gets empty ``input_ids`` / ``labels`` and its
      message in an ``error`` column (``""`` for rows that tokenized), so nothing disappears
      silently; drop the failures explicitly with ``ds.filter(lambda r: not r["error"])``.
    * `encoder`: the encoding engine when `tokenizer` is a path or a transformers tokenizer
      (``"auto"``, ``"fast"``, ``"tokenizers"``; a `ChatTokenizer` carries its own).
    * `num_threads`: threads per call (default: every core; with ``num_proc=P`` pass
      ``cores // P`` to avoid oversubscription).
    * Other keyword arguments go to the template, as in ``apply_chat_template`` (``chat_template``
      picks a template).

    Rows are read as ``chatmask tokenize`` reads Parquet rows: keys whose value is null are
    dropped from the struct parts of messages and tools (Arrow gives every message struct every
    key), while values stored as JSON (``datasets``' ``Json`` feature, which ``load_dataset("json")``
    uses for irregular objects) keep their nulls. A batch that is a plain dict (no Arrow types)
    loses every null-valued key.
    """
    rows = RowTokenizer(
        tokenizer,
        mode,
        messages_field=messages_field,
        tools_field=tools_field,
        finish_reason_field=finish_reason_field,
        on_error=on_error,
        num_threads=num_threads,
        template_kwargs=template_kwargs,
        policy=policy,
        encoder=encoder,
    )
    return MapFn(rows)


def preference_fn(
    tokenizer: Any,
    policy: MaskPolicy | None = None,
    *,
    on_error: str = "raise",
    num_threads: int | None = None,
    encoder: EncoderChoice | None = None,
    **template_kwargs: Any,
) -> MapFn:
    """A function for ``ds.map(fn, batched=True)`` that splits each preference row into a DPO pair,
    as ``chatmask tokenize --task preference`` does (see :mod:`chatmask.preference`).

    The rows have ``prompt`` (messages) with ``chosen`` / ``rejected`` (a str, one assistant
    message or a list of messages), or ``chosen`` / ``rejected`` alone as whole conversations
    sharing their opening messages; the policy's ``field_tools`` / ``field_system`` name the
    tools and system columns. The function adds ``prompt_input_ids``, ``chosen_input_ids``,
    ``rejected_input_ids`` (``List(int32)``), ``chosen_labels``, ``rejected_labels``
    (``List(int64)``, -100 masked) and ``preference_flags`` (``List(string)``, empty when the pair
    is exact and consistent), one row per input row; ``prompt_input_ids + chosen_input_ids`` is
    exactly the chosen conversation's tokenization. `policy` defaults to
    :data:`chatmask.preference.PREFERENCE_POLICY`; under ``overflow="drop"`` a ``dropped`` column
    marks the dropped rows (empty lists). `on_error`, `num_threads`, `encoder` and template
    keyword arguments are as in :func:`map_fn` (``"mark"``: a row that cannot be split keeps
    empty lists and its reason in ``error``).
    """
    rows = PreferenceRows(
        tokenizer,
        policy=policy,
        on_error=on_error,
        num_threads=num_threads,
        template_kwargs=template_kwargs,
        encoder=encoder,
    )
    return MapFn(rows)


def pack_fn(
    max_length: int,
    strategy: str = "bfd",
    *,
    overflow: str = "error",
    pad_to_max_length: bool = False,
    pad_id: int = 0,
) -> PackStep:
    """A function for ``ds.map(fn, batched=True, remove_columns=ds.column_names)`` that packs each
    batch of tokenized rows (``input_ids``, ``labels``, optional ``message_index``) with
    :func:`chatmask.pack`, returning one row per pack. ``remove_columns`` is required: the output has
    fewer rows than the batch, and `datasets` refuses to keep input columns of another length."""
    return PackStep(max_length, strategy, overflow, pad_to_max_length, pad_id)


__all__ = ["MapFn", "PackStep", "map_fn", "pack_fn", "preference_fn"]
