"""``chatmask tokenize --task preference``: DPO-style rows (``prompt`` / ``chosen`` / ``rejected``)
through :meth:`ChatTokenizer.tokenize_preference_batch`.

Two stages replace the parse and tokenize stages of the SFT job: :class:`PreferenceParseStage`
(:func:`chatmask.rows.parse_preference_row`, the same null rule) and :class:`PreferenceStage`.
Output columns: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (list<int32>),
``chosen_labels``, ``rejected_labels`` (list<int64>, -100 = masked) and ``preference_flags``
(list<string>, empty when the pair is exact and consistent; see :mod:`chatmask.preference`). A
row that cannot be split goes to ``errors.jsonl`` with the reason; the manifest counts flagged
pairs by flag.
"""

from __future__ import annotations

from typing import Any

from .._tokenizer import ChatTokenizer
from ..policy import MaskPolicy
from ..preference import FLAGS_COLUMN
from ..rows import parse_preference_row
from .stages import Batch, Stage

TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
LABEL_COLUMNS = ("chosen_labels", "rejected_labels")


class PreferenceParseStage(Stage):
    """Every row through :func:`chatmask.rows.parse_preference_row`."""

    def __init__(self, policy: MaskPolicy) -> None:
        self.policy = policy

    def run(self, batch: Batch) -> None:
        for i, raw in enumerate(batch.rows):
            # Parquet rows were read by their Arrow types (rows rule 2): no further null stripping.
            parsed = parse_preference_row(raw.payload, self.policy, strip_nulls=False if raw.typed else None)
            batch.parsed.append(parsed)
            if parsed.error is not None:
                batch.fail(i, parsed.error)
            else:
                batch.good.append(i)


class PreferenceStage(Stage):
    """The good rows through ``tokenize_preference_batch`` in one call (row by row if the call
    itself fails, so one bad row never loses the batch)."""

    token_columns = TOKEN_COLUMNS
    label_columns = LABEL_COLUMNS

    def __init__(self, tok: ChatTokenizer, policy: MaskPolicy, threads: int | None) -> None:
        self.tok, self.policy, self.threads = tok, policy, threads

    def fields(self, pa: Any) -> list[tuple[str, Any]]:
        ids, labels = pa.list_(pa.int32()), pa.list_(pa.int64())
        return [
            *((c, ids) for c in TOKEN_COLUMNS),
            *((c, labels) for c in LABEL_COLUMNS),
            (FLAGS_COLUMN, pa.list_(pa.string())),
        ]

    def _call(self, rows: list[Any]) -> Any:
        return self.tok.tokenize_preference_batch(rows, self.policy, num_threads=self.threads, on_error="skip")

    def _tables(self, rows: list[Any]) -> tuple[list[tuple[list[int], Any]], list[tuple[int, str]], list[int]]:
        """([(output rows, pyarrow table)], errors, dropped), row indices into `rows`."""
        try:
            result = self._call(rows)
            return [(result.rows.tolist(), result.to_arrow())], list(result.errors), list(result.dropped)
        except Exception:  # noqa: BLE001 - isolate the row that broke the batch; never lose the rest
            pass
        tables: list[tuple[list[int], Any]] = []
        errors: list[tuple[int, str]] = []
        dropped: list[int] = []
        for i, row in enumerate(rows):
            try:
                one = self._call([row])
            except Exception as e:  # noqa: BLE001
                errors.append((i, f"{type(e).__name__}: {e}"))
                continue
            errors.extend((i, msg) for _, msg in one.errors)
            dropped.extend(i for _ in one.dropped)
            if len(one):
                tables.append(([i], one.to_arrow()))
        return tables, errors, dropped

    def run(self, batch: Batch) -> None:
        import pyarrow as pa

        good = batch.good
        if not good:
            return
        tables, errors, dropped = self._tables([batch.parsed[i].conversation for i in good])
        for local, msg in errors:
            batch.fail(good[local], msg)
        for local in dropped:
            batch.drop(good[local])
        batch.good = []
        if not tables:
            return
        table = pa.concat_tables([t for _, t in tables])
        batch.out = [good[local] for rows, _ in tables for local in rows]
        batch.columns.update({c: table.column(c) for c in (*TOKEN_COLUMNS, *LABEL_COLUMNS)})
        batch.columns[FLAGS_COLUMN] = table.column("flags")

    @staticmethod
    def count_flags(table: Any, into: dict[str, int]) -> None:
        """Adds a part's flagged pairs to `into`: ``pairs`` in total and per flag (``straddles_split``
        without its branch)."""
        for flags in table.column(FLAGS_COLUMN).to_pylist():
            if flags:
                into["pairs"] = into.get("pairs", 0) + 1
            for flag in dict.fromkeys(f.split(":")[0] for f in flags):
                into[flag] = into.get(flag, 0) + 1
