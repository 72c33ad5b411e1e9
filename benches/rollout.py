"""Rollouts on the fixtures: `tokenize_rollout_batch` throughput against `tokenize_batch`.

    python benches/rollout.py [--tokenizers qwen3 llama3] [--repeat 3] [--threads N] [--bridge]

Every fixture conversation with an assistant message after the first message becomes a rollout
whose assistant messages are all sampled, with the template's own ids for their text
(tests/_rollouts.py computes them independently). `tokenize_rollout_batch` on those rollouts is
timed against `tokenize_batch(policy=ROLLOUT_POLICY)` on the same conversations: medians of
--repeat interleaved runs, and the geometric mean of the ratios over tokenizers. Rows the
template refuses, or whose messages have no token boundary, are left out of both sides.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _parity import TOKENIZERS_DIR, fixture_tokenizers, oracle  # noqa: E402
from _rollouts import fixture_rows, regions  # noqa: E402
from _timing import geometric_mean, interleaved_medians  # noqa: E402

import chatmask  # noqa: E402
from chatmask.rollout import ROLLOUT_POLICY  # noqa: E402


def rollouts(tok) -> tuple[list[dict], list[dict], int]:
    """(conversation rows, rollout rows, sampled turns): only rows whose regions are found."""
    date = {"date_string": oracle().DATE_STRING}
    conversations, rows, turns = [], [], 0
    for _, row in fixture_rows():
        tools = {"tools": row["tools"]} if row.get("tools") else {}
        try:
            regs = {k: r for k, r in regions(tok, row["messages"], **date, **tools).items() if k > 0}
        except chatmask.ChatMaskError:
            continue
        if not regs:
            continue
        assistants = [k for k, m in enumerate(row["messages"]) if m.get("role") == "assistant"]
        completion = [regs[k].ids if k in regs else None for k in assistants]
        conversations.append({"messages": row["messages"], **tools})
        rows.append({"messages": row["messages"], "completion_ids": completion, **tools})
        turns += len(regs)
    return conversations, rows, turns


def throughput(tok, repeat: int, threads: int | None, bridge: bool) -> tuple[float, float, int, int]:
    date = {"date_string": oracle().DATE_STRING}
    conversations, rows, turns = rollouts(tok)
    calls = {
        "base": lambda: tok.tokenize_batch(conversations, policy=ROLLOUT_POLICY, num_threads=threads, **date),
        "ours": lambda: tok.tokenize_rollout_batch(rows, bridge=bridge, num_threads=threads, **date),
    }
    medians = interleaved_medians(calls, repeat)
    return medians["base"], medians["ours"], len(rows), turns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", nargs="*", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bridge", action="store_true")
    args = parser.parse_args(argv)
    names = args.tokenizers or fixture_tokenizers()
    print(f"chatmask {chatmask.__version__}, {os.cpu_count()} CPUs, bridge={args.bridge}\n")
    print("| tokenizer | rollouts | sampled turns | tokenize_batch(policy) s | tokenize_rollout_batch s | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    ratios = []
    for name in names:
        tok = chatmask.ChatTokenizer.from_pretrained(TOKENIZERS_DIR / name)
        base, ours, n, turns = throughput(tok, args.repeat, args.threads, args.bridge)
        ratios.append(ours / base)
        print(f"| {name} | {n} | {turns} | {base:.3f} | {ours:.3f} | {ours / base:.3f} |", flush=True)
    geomean = geometric_mean(ratios)
    print(f"\ngeometric mean of the ratios: {geomean:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
