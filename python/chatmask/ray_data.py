"""Ray Data adapter: a callable class for ``Dataset.map_batches`` (one tokenizer per actor).

    import ray
    from chatmask.ray_data import TokenizeBatch

    ds = ray.data.read_parquet("s3://bucket/chats/")
    ds = ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs={"tokenizer": tok, "mode": "all"},
        compute=ray.data.ActorPoolStrategy(size=8),
        batch_format="pyarrow",
    )
    ds.write_parquet("s3://bucket/tokenized/")

Preference pairs (DPO rows) go through ``TokenizePreferenceBatch`` the same way.

Packing is one more step, per block (rows of different blocks never share a pack; larger
blocks fill better, see docs/packing.md)::

    ds = ds.map_batches(PackBatch, fn_constructor_kwargs={"max_length": 4096}, batch_size=10_000,
                        batch_format="pyarrow")

The module is named ``ray_data`` so that it never shadows the ``ray`` package. It imports
neither ray nor pyarrow until it runs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ._adapter import RowTokenizer, require_columns
from ._pack_adapter import PackStep
from ._preference_adapter import PreferenceRows
from ._tokenizer import EncoderChoice
from .policy import MaskPolicy


def _actor_cpus() -> int | None:
    """The CPUs Ray assigned to the current actor or task (at least 1), or None outside Ray."""
    try:
        import ray
    except ImportError:
        return None
    try:
        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:
        return None
    return max(1, int(cpus)) if cpus else None


class TokenizeBatch:
    """Tokenize and label the conversations of a Ray Data batch (use ``batch_format="pyarrow"``).

    Ray builds one instance per actor, so the tokenizer is built (or unpickled) once per worker.
    `tokenizer` is a :class:`chatmask.ChatTokenizer` (pickled with the files or parts it was
    built from, so workers need no access to the original directory), a tokenizer directory
    path (loaded by each worker, so it must exist on every node), or a transformers fast
    tokenizer (``encoder=`` picks the engine for those two). `mode`, `messages_field`,
    `tools_field`, `finish_reason_field`, `policy` and template keyword arguments are as in
    :func:`chatmask.datasets.map_fn`.

    The output has one row per input row, in order: the `keep_columns` (default: every input
    column except the messages and tools columns, and the policy's ``field_system`` column),
    then ``input_ids`` (``list<int32>``) and ``labels`` (``list<int64>``, ``-100`` masked); with
    a `policy`, then ``message_index`` (``list<int32>``), ``span_method`` (string, ``""`` for a row without tokens),
    ``truncated`` (int32) and, under ``overflow="drop"``, ``dropped`` (bool; a dropped row has
    empty lists). ``on_error="raise"`` (default) fails the
    batch on the first bad row, naming it by its position in the batch and its ``id``;
    ``on_error="mark"`` keeps the row with empty lists and its message in an ``error`` column
    (``""`` for rows that tokenized).

    `num_threads` defaults to the CPUs Ray gave the actor (``map_batches(num_cpus=...)``,
    at least 1), outside Ray to every core.
    """

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
        keep_columns: Sequence[str] | None = None,
        policy: MaskPolicy | None = None,
        encoder: EncoderChoice | None = None,
        **template_kwargs: Any,
    ) -> None:
        if num_threads is None:
            num_threads = _actor_cpus()
        self.rows: RowTokenizer | PreferenceRows = RowTokenizer(
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
        self.keep_columns = None if keep_columns is None else list(keep_columns)

    def _kept(self, names: Sequence[str]) -> list[str]:
        if self.keep_columns is None:
            skip = {*self.rows.consumed_columns(), *self.rows.output_names()}
            return [n for n in names if n not in skip]
        missing = [n for n in self.keep_columns if n not in names]
        if missing:
            raise KeyError(f"keep_columns {missing} are not in the batch (columns: {', '.join(names)})")
        return self.keep_columns

    def __call__(self, batch: Any) -> Any:
        """A ``pyarrow.Table`` in, a ``pyarrow.Table`` out; a mapping of columns in, a dict out."""
        try:
            import pyarrow as pa
        except ImportError:  # pragma: no cover - Ray Data depends on pyarrow
            pa = None
        if pa is not None and isinstance(batch, pa.Table):
            return self._table(batch, pa)
        if isinstance(batch, Mapping):
            return self._mapping(batch)
        raise TypeError(
            f"{type(self).__name__} takes a pyarrow.Table (map_batches(..., batch_format='pyarrow')) or a "
            f"mapping of columns, not {type(batch).__name__}"
        )

    def _table(self, table: Any, pa: Any) -> Any:
        names = list(table.column_names)
        require_columns(names, self.rows.required_columns())
        columns = {n: table.column(n).to_pylist() for n in self.rows.input_columns() if n in names}
        types = {n: table.schema.field(n).type for n in columns}
        out = self.rows.tokenize(columns, types=types, decode_json=True)
        result = {n: table.column(n) for n in self._kept(names)}
        result.update(out.arrow_columns(pa, self.rows.policy, self.rows.on_error))
        return pa.table(result)

    def _mapping(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        names = list(batch)
        require_columns(names, self.rows.required_columns())
        columns = {
            n: (batch[n].tolist() if isinstance(batch[n], np.ndarray) else list(batch[n]))
            for n in self.rows.input_columns()
            if n in batch
        }
        out = self.rows.tokenize(columns)
        result: dict[str, Any] = {n: batch[n] for n in self._kept(names)}
        result.update(out.output_columns(self.rows.policy, self.rows.on_error))
        return result


class TokenizePreferenceBatch(TokenizeBatch):
    """Split the preference rows of a Ray Data batch into DPO pairs, as
    :func:`chatmask.datasets.preference_fn` does (use ``batch_format="pyarrow"``).

    The output has one row per input row, in order: the `keep_columns` (default: every input
    column except ``prompt``, ``chosen``, ``rejected`` and the policy's tools and system
    columns), then ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``
    (``list<int32>``), ``chosen_labels``, ``rejected_labels`` (``list<int64>``) and
    ``preference_flags`` (``list<string>``), plus ``dropped`` and ``error`` as in
    :class:`TokenizeBatch`. `tokenizer`, `on_error`, `num_threads` and `encoder` are as there.
    """

    def __init__(
        self,
        tokenizer: Any,
        policy: MaskPolicy | None = None,
        *,
        on_error: str = "raise",
        num_threads: int | None = None,
        keep_columns: Sequence[str] | None = None,
        encoder: EncoderChoice | None = None,
        **template_kwargs: Any,
    ) -> None:
        self.rows = PreferenceRows(
            tokenizer,
            policy=policy,
            on_error=on_error,
            num_threads=_actor_cpus() if num_threads is None else num_threads,
            template_kwargs=template_kwargs,
            encoder=encoder,
        )
        self.keep_columns = None if keep_columns is None else list(keep_columns)


class PackBatch(PackStep):
    """For ``map_batches``: the block's tokenized rows (``input_ids``, ``labels``, optional
    ``message_index``) packed with :func:`chatmask.pack`; returns a pyarrow Table, one row per pack
    (``input_ids``, ``labels``, ``position_ids``, ``seq_lens``, ``message_index``)."""

    def __call__(self, batch: Any) -> Any:
        return self.table(self._pack(self.batch_of(batch)))


__all__ = ["PackBatch", "TokenizeBatch", "TokenizePreferenceBatch"]
