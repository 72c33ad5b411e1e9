"""Packing on the fixture corpus: fill efficiency, pack counts against the lower bound, time.

    python benches/pack.py [--tokenizer qwen3] [--lengths 4096 8192] [--repeat 5]

Every conversation of ../shared/fixtures/conversations is tokenized once (the default MaskPolicy),
then packed by chatmask's bfd, ffd and sequential, and by TRL's ``pack_dataset(strategy="bfd")`` on
the same rows (``pip install --no-deps trl``; it imports without torch), both with TRL's default
``map`` batch of 1,000 rows (what a user gets) and with the whole corpus in one batch (the same
input chatmask sees). TRL truncates rows longer than ``seq_length``, so chatmask runs with
``overflow="truncate_right"`` here. The lower bound is ``ceil(total tokens / max_length)``.
Times are the best of ``--repeat`` runs (wall and process CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

import chatmask

SHARED = Path(os.environ.get("CHATMASK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def load(tokenizer: str) -> chatmask.TokenizedBatch:
    tok = chatmask.ChatTokenizer.from_pretrained(SHARED / "fixtures" / "tokenizers" / tokenizer)
    rows = []
    for path in sorted((SHARED / "fixtures" / "conversations").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return tok.tokenize_batch(rows, policy=chatmask.MaskPolicy(), on_error="skip")


def best(fn, repeat: int):
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return out, min(walls), min(cpus)


def trl_pack(batch: chatmask.TokenizedBatch, L: int, batch_size: int | None):
    import datasets
    from trl.data_utils import pack_dataset

    ds = datasets.Dataset.from_dict(
        {
            "input_ids": [batch[i]["input_ids"].tolist() for i in range(len(batch))],
            "labels": [batch[i]["labels"].tolist() for i in range(len(batch))],
        }
    )
    kwargs = {} if batch_size is None else {"batch_size": batch_size}

    def run():
        return pack_dataset(ds, L, strategy="bfd", map_kwargs=kwargs)

    return run


def blocks(batch: chatmask.TokenizedBatch, size: int) -> list[chatmask.TokenizedBatch]:
    """The batch cut into blocks of `size` rows (as a Ray block or a datasets map batch sees it)."""
    out = []
    for a in range(0, len(batch), size):
        b = min(a + size, len(batch))
        lo, hi = int(batch.offsets[a]), int(batch.offsets[b])
        off = batch.offsets[a : b + 1] - lo
        mi = None if batch.message_index is None else batch.message_index[lo:hi]
        out.append(
            chatmask.TokenizedBatch(
                batch.input_ids[lo:hi], batch.labels[lo:hi], off, off, batch.rows[a:b], [], message_index=mi
            )
        )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default="qwen3")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    datasets_log = __import__("datasets").logging
    datasets_log.disable_progress_bar()
    batch = load(args.tokenizer)
    lens = np.diff(batch.offsets)
    print(
        f"corpus: {len(batch)} rows ({len(batch.errors)} failed to tokenize), {int(lens.sum()):,} tokens, "
        f"row length median {int(np.median(lens))}, max {int(lens.max())}; tokenizer {args.tokenizer}"
    )
    print(
        f"{'max_length':>10} {'packer':<28} {'packs':>6} {'bound':>6} {'efficiency':>10} {'wall ms':>8} {'cpu ms':>8}"
    )
    for L in args.lengths:
        kept = int(np.minimum(lens, L).sum())
        bound = math.ceil(kept / L)
        for strategy in ("bfd", "ffd", "sequential"):
            packed, wall, cpu = best(
                lambda s=strategy: chatmask.pack(batch, L, strategy=s, overflow="truncate_right"), args.repeat
            )
            print(
                f"{L:>10} {'chatmask ' + strategy:<28} {len(packed):>6} {bound:>6} {packed.efficiency:>10.4%} {wall * 1e3:>8.1f} {cpu * 1e3:>8.1f}"
            )
        for size in (250, 1000):  # per-block packing (the adapters): the cost at block edges
            parts = [chatmask.pack(b, L, overflow="truncate_right") for b in blocks(batch, size)]
            packs = sum(len(p) for p in parts)
            tokens = sum(p.tokens for p in parts)
            label = f"chatmask bfd, blocks of {size}"
            print(f"{L:>10} {label:<28} {packs:>6} {bound:>6} {tokens / (packs * L):>10.4%} {'':>8} {'':>8}")
        try:
            for label, size in (("TRL bfd (map batch 1000)", None), ("TRL bfd (one batch)", len(batch))):
                out, wall, cpu = best(trl_pack(batch, L, size), args.repeat)
                seq = out["seq_lengths"]
                tokens = sum(sum(s) for s in seq)
                print(
                    f"{L:>10} {label:<28} {len(seq):>6} {bound:>6} {tokens / (len(seq) * L):>10.4%} {wall * 1e3:>8.1f} {cpu * 1e3:>8.1f}"
                )
        except ImportError as e:
            print(f"{L:>10} TRL not importable ({e}); pip install --no-deps trl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
