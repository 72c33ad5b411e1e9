"""The floor of the flag cost (docs/truth.md): what locating the spans costs on its own, as a
share of the unflagged reference-mode batches on the same rows.

    python benches/locate_cost.py [--tokenizers llama3,qwen3] [--repeat 3] [--by-row-kind]

Locating = one ``message_spans`` call (plain render + marked render + stripping its markers)
minus one plain ``render`` per row, single thread, CPU time, best of --repeat. The batches are
``tokenize_batch(mode=...)`` with one thread, each conversation file one batch, as in
benches/reference_flags.py. Rows the template refuses count on both sides alike.

``--by-row-kind`` instead splits the whole flag cost (flagged over unflagged batches) by kind of
row: rows whose spans are located one field at a time (``span_method`` other than one render),
other rows with their own ``tools`` (the generation-prompt probe renders again with them), the
rest.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _reference_vs_spans as rvs  # noqa: E402
from _parity import oracle  # noqa: E402
from _timing import best_cpu  # noqa: E402
from reference_flags import MODES, rows_of  # noqa: E402


def per_row(core: Any, batches: list[list[dict]], call: str, date: dict) -> Callable[[], None]:
    def run() -> None:
        for rows in batches:
            for row in rows:
                kwargs = {**date, **({"tools": row["tools"]} if "tools" in row else {})}
                try:
                    getattr(core, call)(row["messages"], False, None, **kwargs)
                except Exception:  # noqa: BLE001 - a refused row costs the same on both sides
                    pass

    return run


def row_kind(core: Any, row: dict, date: dict) -> str:
    kwargs = {**date, **({"tools": row["tools"]} if "tools" in row else {})}
    try:
        method = str(core.message_spans(row["messages"], False, None, **kwargs)[2])
    except Exception:  # noqa: BLE001 - not located: the flagged batch marks it unmeasured
        return "not located"
    if method != "one_render":
        return "field by field"
    return "own tools" if "tools" in row else "other"


def by_row_kind(names: list[str], batches: list[list[dict]], date: dict, repeat: int) -> None:
    """Where the flag cost goes: each kind of row's share of the rows and of the extra CPU."""
    print("| tokenizer | mode | kind | rows | plain s | flagged s | share of the extra |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in names:
        _, cm = rvs.load_pair(name)
        kinds: dict[str, list[list[dict]]] = collections.defaultdict(list)
        for rows in batches:  # each file's rows of one kind stay one batch
            split = collections.defaultdict(list)
            for row in rows:
                split[row_kind(cm._core, row, date)].append(row)
            for kind, part in split.items():
                kinds[kind].append(part)
        for mode in MODES:
            cost = {}
            for kind, parts in sorted(kinds.items()):

                def run(flag: bool, parts: list = parts, mode: str = mode) -> None:
                    for part in parts:
                        cm.tokenize_batch(part, mode=mode, on_error="skip", num_threads=1, flag_reference=flag, **date)

                cost[kind] = (best_cpu(lambda: run(False), repeat), best_cpu(lambda: run(True), repeat))
            extra = sum(f - p for p, f in cost.values())
            for kind, (plain, flagged) in cost.items():
                n = sum(len(p) for p in kinds[kind])
                print(
                    f"| {name} | {mode} | {kind} | {n} | {plain:.3f} | {flagged:.3f} | "
                    f"{100 * (flagged - plain) / extra:.0f}% |",
                    flush=True,
                )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--by-row-kind", action="store_true", help="split the whole flag cost by kind of row")
    args = ap.parse_args(argv)
    names = args.tokenizers.split(",") if args.tokenizers else rvs.base_tokenizer_names()
    date = {"date_string": oracle().DATE_STRING}
    batches = [rows_of(path, None) for path in rvs.conversation_paths()]
    if args.by_row_kind:
        by_row_kind(names, batches, date, args.repeat)
        return 0
    print("| tokenizer | locate s | " + " | ".join(f"{m} plain s | {m} locate share" for m in MODES) + " |")
    print("|---|---:|" + "---:|---:|" * len(MODES))
    total_locate = total_plain = 0.0
    for name in names:
        _, cm = rvs.load_pair(name)
        spans = best_cpu(per_row(cm._core, batches, "message_spans", date), args.repeat)
        render = best_cpu(per_row(cm._core, batches, "render", date), args.repeat)
        locate = spans - render
        cells = []
        for mode in MODES:

            def plain(mode: str = mode) -> None:
                for rows in batches:
                    cm.tokenize_batch(rows, mode=mode, on_error="skip", num_threads=1, **date)

            seconds = best_cpu(plain, args.repeat)
            total_locate += locate
            total_plain += seconds
            cells.append(f"{seconds:.2f} | +{100 * locate / seconds:.0f}%")
        print(f"| {name} | {locate:.2f} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nlocating alone, over every tokenizer and mode: +{100 * total_locate / total_plain:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
