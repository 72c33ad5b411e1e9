"""Preference pairs on the fixtures: throughput against `tokenize_batch`, and TRL's DPO tokenization.

    python benches/preference.py [--tokenizers qwen3 llama3] [--repeat 3] [--threads N]

Pairs come from every fixture conversation with at least two assistant turns (tests/_preference_pairs.py:
prompt = everything before the last assistant message, chosen = that message, rejected = the next
qualifying row's last assistant text).

(a) Throughput: `tokenize_preference_batch` on the pairs against `tokenize_batch(policy=...)` on
    the same 2N branch conversations with the same policy; medians of --repeat runs, and the
    geometric mean of the ratios over tokenizers.
(b) TRL: each pair as trl 1.x's DPO tokenization builds it (three renders tokenized by
    `apply_chat_template`, no special tokens added, branches sliced at len(prompt_ids); see
    `trl_pair`), compared with the exact pair; every differing row gets a cause:
    history rewritten (the prompt's render is not a text prefix of prompt+completion), BOS doubled,
    merge across the boundary (a text prefix, but not a token prefix), split elsewhere (a token
    prefix, but TRL's prompt ends elsewhere than the completion's first owned token).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _parity import TOKENIZERS_DIR, fixture_tokenizers  # noqa: E402
from _preference_pairs import branches, date_kwargs, fixture_pairs, trl_cause, trl_pair  # noqa: E402
from _timing import geometric_mean, interleaved_medians  # noqa: E402

import chatmask  # noqa: E402
from chatmask.preference import PREFERENCE_POLICY  # noqa: E402


def branch_rows(pairs: list[dict]) -> list[dict]:
    out = []
    for pair in pairs:
        for conversation in branches(pair):
            out.append({"messages": conversation, **({"tools": pair["tools"]} if "tools" in pair else {})})
    return out


def throughput(tok, pairs, repeat: int, threads: int | None) -> tuple[float, float, int]:
    """Medians of `repeat` runs of each, interleaved (base, ours, base, ...) so that drift in a
    shared machine's load falls on both alike."""
    kwargs = date_kwargs()
    rows = branch_rows(pairs)
    calls = {
        "base": lambda: tok.tokenize_batch(
            rows, policy=PREFERENCE_POLICY, on_error="skip", num_threads=threads, **kwargs
        ),
        "ours": lambda: tok.tokenize_preference_batch(pairs, on_error="skip", num_threads=threads, **kwargs),
    }
    medians = interleaved_medians(calls, repeat)
    return medians["base"], medians["ours"], len(rows)


def compare_trl(tok, pairs) -> tuple[int, int, Counter, Counter]:
    """(pairs compared, pairs differing, causes, our flags) on one tokenizer."""
    kwargs = date_kwargs()
    batch = tok.tokenize_preference_batch(pairs, on_error="skip", **kwargs)
    differ, causes, flags = 0, Counter(), Counter()
    for k, row in enumerate(batch.rows.tolist()):
        exact = batch[k]
        flags.update(f.split(":")[0] for f in exact["flags"])
        trl = trl_pair(tok, pairs[row], **kwargs)
        same = all(trl[f] == exact[f].tolist() for f in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
        if not same:
            differ += 1
            causes[trl_cause(tok, trl)] += 1
    return len(batch), differ, causes, flags


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", nargs="*", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="qualifying rows per conversation file")
    args = parser.parse_args(argv)
    names = args.tokenizers or fixture_tokenizers()
    pairs = [p for _, p in fixture_pairs(args.limit)]
    print(
        f"{len(pairs)} pairs from the fixture conversations; chatmask {chatmask.__version__}, {os.cpu_count()} CPUs\n"
    )
    ratios, trl_rows = [], []
    print("| tokenizer | branch rows | tokenize_batch(policy) s | tokenize_preference_batch s | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        tok = chatmask.ChatTokenizer.from_pretrained(TOKENIZERS_DIR / name)
        base, ours, n = throughput(tok, pairs, args.repeat, args.threads)
        ratios.append(ours / base)
        print(f"| {name} | {n} | {base:.3f} | {ours:.3f} | {ours / base:.3f} |", flush=True)
        trl_rows.append((name, *compare_trl(tok, pairs)))
    geomean = geometric_mean(ratios)
    print(f"\ngeometric mean of the ratios: {geomean:.3f}\n")
    print("| tokenizer | pairs | TRL differs | causes | chatmask flags (per branch) |")
    print("|---|---:|---:|---|---|")
    for name, n, differ, causes, flags in trl_rows:
        causes_text = ", ".join(f"{c}: {k}" for c, k in causes.most_common()) or "-"
        flags_text = ", ".join(f"{f}: {k}" for f, k in flags.most_common()) or "-"
        print(f"| {name} | {n} | {differ} | {causes_text} | {flags_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
