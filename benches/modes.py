"""Unflagged reference-mode batches per tokenizer and mode: the least CPU time of `tokenize_batch`
over the whole fixture corpus (each conversation file one batch), to compare two builds.

    python benches/modes.py [--threads 1] [--repeat 3] [--tokenizers qwen3,llama3] [--json OUT]

Run it on each build (alternating, several times: a shared machine's noise is larger than most
changes), writing each run's figures with `--json`; `--compare A1.json,A2.json B1.json,B2.json`
takes each build's least time per cell and prints B over A per cell and the geometric mean per
mode.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _reference_vs_spans as rvs  # noqa: E402
from _differential import native_core  # noqa: E402
from _parity import oracle  # noqa: E402
from _timing import best_cpu, geometric_mean  # noqa: E402
from reference_flags import MODES, rows_of  # noqa: E402


def measure(names: list[str], modes: list[str], threads: int, repeat: int) -> dict[str, float]:
    date = {"date_string": oracle().DATE_STRING}
    batches = [rows_of(path, None) for path in rvs.conversation_paths()]
    out = {}
    for name in names:
        tok = native_core(name)
        for mode in modes:

            def run(tok=tok, mode=mode) -> None:
                for rows in batches:
                    tok.tokenize_batch(rows, mode=mode, on_error="skip", num_threads=threads, **date)

            out[f"{name} {mode}"] = best_cpu(run, repeat)
            print(f"{name:18} {mode:9} {out[f'{name} {mode}']:.3f}s", flush=True)
    return out


def least(paths: list[str]) -> dict[str, float]:
    """Per cell, the least time over several runs' --json files."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    return {k: min(run[k] for run in runs if k in run) for k in runs[0]}


def compare(before: dict[str, float], after: dict[str, float]) -> None:
    for mode in MODES:
        cells = [k for k in before if k.endswith(f" {mode}") and k in after]
        for k in cells:
            print(f"{k:28} {before[k]:.3f}s -> {after[k]:.3f}s  x{after[k] / before[k]:.3f}")
        if cells:
            print(f"{mode}: geometric mean x{geometric_mean([after[k] / before[k] for k in cells]):.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="comma-separated --json files")
    args = ap.parse_args(argv)
    if args.compare:
        before, after = (least(paths.split(",")) for paths in args.compare)
        compare(before, after)
        return 0
    names = args.tokenizers.split(",") if args.tokenizers else rvs.base_tokenizer_names()
    figures = measure(names, args.modes.split(","), args.threads, args.repeat)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
