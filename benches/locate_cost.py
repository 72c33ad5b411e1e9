"""The floor of the flag cost (docs/truth.md): what locating the spans costs on its own, as a
share of the unflagged reference-mode batches on the same rows.

    python benches/locate_cost.py [--tokenizers llama3,qwen3] [--repeat 3]

Locating = one ``message_spans`` call (plain render + marked render + stripping its markers)
minus one plain ``render`` per row, single thread, CPU time, best of --repeat. The batches are
``tokenize_batch(mode=...)`` with one thread, each conversation file one batch, as in
benches/reference_flags.py. Rows the template refuses count on both sides alike.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _reference_vs_spans as rvs  # noqa: E402
from _parity import oracle  # noqa: E402
from reference_flags import MODES, rows_of  # noqa: E402


def best_cpu(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    names = args.tokenizers.split(",") if args.tokenizers else rvs.base_tokenizer_names()
    date = {"date_string": oracle().DATE_STRING}
    batches = [rows_of(path, None) for path in rvs.conversation_paths()]
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
