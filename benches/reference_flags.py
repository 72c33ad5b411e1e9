"""Run-time reference flags (``tokenize_batch(..., flag_reference=True)``, :mod:`chatmask.truth`)
over the fixture corpus: wrong rows per tokenizer and mode, the cost of flagging, and (with
``--compare``) a row-by-row comparison with ``benches/reference_errors.py``'s criterion
(``tests/_reference_vs_spans.measure_row``, which runs the Python reference: slow).

    python benches/reference_flags.py [--limit N] [--tokenizers qwen3,llama3] [--compare] [--repeat 3]

Cost is the best of ``--repeat`` timings of the flagged batch over the unflagged one, on the same
rows (each conversation file one batch), in wall time and in CPU time (``--threads 1`` makes the
CPU ratio the one a busy machine moves least). Per mode and in total.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _reference_vs_spans as rvs  # noqa: E402
from _parity import oracle  # noqa: E402

MODES = ("last", "all", "multistep")


def rows_of(path: Path, limit: int | None) -> list[dict]:
    rows = []
    for _, row in rvs.read_rows(path, limit):
        rows.append({"messages": row["messages"], **({"tools": row["tools"]} if row.get("tools") else {})})
    return rows


def best(fn, repeat: int) -> tuple[float, float]:
    """The best wall time and the best CPU time of `repeat` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return min(walls), min(cpus)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="rows per conversation file (default: all)")
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--compare", action="store_true", help="compare row by row with measure_row (runs the reference)")
    ap.add_argument("--repeat", type=int, default=3, help="timings per batch for the cost (0: no timing)")
    ap.add_argument("--threads", type=int, default=None, help="threads per batch (default: all)")
    args = ap.parse_args(argv)
    names = args.tokenizers.split(",") if args.tokenizers else rvs.base_tokenizer_names()
    modes = tuple(args.modes.split(","))
    paths = rvs.conversation_paths()
    date = {"date_string": oracle().DATE_STRING}
    disagreements = 0
    cost: dict[str, list[float]] = collections.defaultdict(
        lambda: [0.0, 0.0, 0.0, 0.0]
    )  # mode: plain, flagged (wall, cpu)
    threads = args.threads
    print(
        f"{'tokenizer':18} {'mode':9} {'rows':>6} {'flagged':>7} {'unmeasured':>10} {'bench':>6} {'agree':>6}  causes"
    )
    for name in names:
        ref_tok, cm = rvs.load_pair(name)
        for mode in modes:
            rows_total = flagged = unmeasured = bench_wrong = agree = 0
            causes: collections.Counter = collections.Counter()
            for path in paths:
                rows = rows_of(path, args.limit)
                batch = cm.tokenize_batch(rows, mode=mode, on_error="skip", flag_reference=True, **date)
                if args.repeat:
                    for flag, at in ((False, 0), (True, 2)):

                        def run(flag: bool = flag, rows: list = rows, mode: str = mode) -> None:
                            cm.tokenize_batch(
                                rows, mode=mode, on_error="skip", num_threads=threads, flag_reference=flag, **date
                            )

                        wall, cpu = best(run, args.repeat)
                        cost[mode][at] += wall
                        cost[mode][at + 1] += cpu
                wrong_rows = {int(batch.rows[i]): c for i, c in enumerate(batch.reference_causes) if c}
                wrong_rows.update({r: "raises" for r in batch.reference_raised})
                unmeasured += int(batch.reference_unmeasured.sum())
                rows_total += len(rows)
                flagged += len(wrong_rows)
                for c in wrong_rows.values():
                    causes.update(c.split(","))
                if args.compare:
                    for i, row in enumerate(rows):
                        kwargs = {**date, **({"tools": row["tools"]} if row.get("tools") else {})}
                        view = rvs.span_view(cm, row["messages"], kwargs)
                        tally = rvs.measure_row(ref_tok, view, row["messages"], mode, kwargs)
                        bench_wrong += tally.wrong
                        mine = set(wrong_rows.get(i, "").split(",")) - {""}
                        theirs = {r for r in rvs.WRONG_REASONS if tally.reasons[r]}
                        if mine == theirs:  # the same causes, not only the same verdict
                            agree += 1
                        else:
                            disagreements += 1
                            print(
                                f"  DISAGREE {name} {mode} {path.name} row {i}: flags {sorted(mine)}, bench {sorted(theirs)}"
                            )
            print(
                f"{name:18} {mode:9} {rows_total:6} {flagged:7} {unmeasured:10} "
                f"{bench_wrong if args.compare else '-':>6} {agree if args.compare else '-':>6}  "
                + ", ".join(f"{c} {n}" for c, n in sorted(causes.items())),
                flush=True,
            )
    if cost:
        print(f"\nflagging cost (threads: {threads or 'all'}): flagged / plain, best of {args.repeat}")
        totals = [sum(c[k] for c in cost.values()) for k in range(4)]
        for mode, (pw, pc, fw, fc) in [*cost.items(), ("total", totals)]:
            print(
                f"  {mode:9} wall {fw:7.2f}s / {pw:7.2f}s = +{100 * (fw / pw - 1):5.1f}%   "
                f"cpu {fc:7.2f}s / {pc:7.2f}s = +{100 * (fc / pc - 1):5.1f}%"
            )
    return 1 if disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
