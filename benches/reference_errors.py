"""How often the reference's prefix-count masks are wrong, measured against chatmask's spans.

For each fixture tokenizer (not the ``-gen`` copies) and each mode (last, all, multistep), over
the conversation fixtures: rows, rows where the reference is wrong (see
``tests/_reference_vs_spans.measure_row``: it raises where chatmask succeeds, its masks have the
wrong length, it leaves a field of a targeted message untrained, or it trains another message's
tokens or a label that is not the token), rows where it only trains template text (not wrong),
and rows where both raise. ``hdr-only`` counts wrong rows whose only fault is trained tokens that
chatmask's ``message_index`` gives to a non-target message *before* that message's first field
(its header region); with correct attribution such tokens are template text, so these rows
measure chatmask's attribution, not the reference (``_reference_vs_spans.error_table``).

    python benches/reference_errors.py [--limit N] [--tokenizers qwen3,llama3] [--files a.jsonl,...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _reference_vs_spans as rvs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="rows per conversation file (default: all)")
    ap.add_argument("--tokenizers", default=None, help="comma-separated fixture names (default: all but -gen)")
    ap.add_argument("--files", default=None, help="comma-separated conversation files (default: all)")
    ap.add_argument("--modes", default=",".join(rvs.MODES))
    ap.add_argument("--examples", type=int, default=3, help="example rows to print per tokenizer and mode")
    args = ap.parse_args(argv)

    names = args.tokenizers.split(",") if args.tokenizers else rvs.base_tokenizer_names()
    paths = rvs.conversation_paths(args.files.split(",") if args.files else None)
    modes = tuple(args.modes.split(","))
    for path in [rvs.TOKENIZERS_DIR / n for n in names] + paths:
        if not path.exists():
            print(f"missing fixture: {path}", file=sys.stderr)
            return 2

    results: dict[str, dict[str, rvs.ErrorTally]] = {}
    start = time.perf_counter()
    for name in names:
        ref_tok, cm = rvs.load_pair(name)
        results[name] = {mode: rvs.ErrorTally() for mode in modes}
        for path in paths:
            t0 = time.perf_counter()
            per_mode = rvs.measure_file(ref_tok, cm, path, args.limit, modes)
            for mode, tally in per_mode.items():
                results[name][mode].add(tally)
            line = "  ".join(f"{m}: {t.wrong}/{t.rows} wrong" for m, t in per_mode.items())
            print(f"{name:18} {path.name:28} {line}  [{time.perf_counter() - t0:.1f}s]", flush=True)
    print()
    print(rvs.error_table(results))
    unmeasurable = 0
    for name, by_mode in results.items():
        for mode, tally in by_mode.items():
            unmeasurable += len(tally.unmeasurable)
            for line in tally.unmeasurable[:3]:
                print(f"UNMEASURABLE {name} {line}")
            for line in tally.examples[: args.examples]:
                print(f"  e.g. {name:18} {line[:300]}")
    print(f"\n{time.perf_counter() - start:.0f}s")
    return 1 if unmeasurable else 0


if __name__ == "__main__":
    sys.exit(main())
