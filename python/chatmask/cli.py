"""The ``chatmask`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

RED, GREEN, DIM, RESET = "\033[31m", "\033[32m", "\033[2m", "\033[0m"


def render_mask(pieces: Sequence[str], labels: Sequence[int], color: bool) -> str:
    """Each token's text; trained tokens green (or in [[...]] without colour), masked ones dim."""
    out = []
    for piece, label in zip(pieces, labels):
        text = piece.replace("\n", "\\n\n")
        if label == -100:
            out.append(f"{DIM}{text}{RESET}" if color else text)
        else:
            out.append(f"{GREEN}{text}{RESET}" if color else f"[[{text}]]")
    return "".join(out)


def _demo(args: argparse.Namespace) -> int:
    from .demo import demo_conversations, demo_tokenizer

    tok = demo_tokenizer()
    rows = demo_conversations()
    started = time.perf_counter()
    batch = tok.tokenize_batch([r["messages"] for r in rows], mode=args.mode, on_error="skip")
    seconds = time.perf_counter() - started
    trained = int((batch.labels != -100).sum())
    print(
        f"demo: {len(rows)} conversations -> {len(batch)} rows, {len(batch.input_ids)} tokens "
        f"({trained} trained), {len(batch.errors)} errors, mode={args.mode}, {seconds * 1000:.1f} ms"
    )
    for row, message in batch.errors:
        print(f"  row {row} ({rows[row]['id']}): {message}")
    shown = batch[min(args.row, len(batch) - 1)]
    print(f"\nrow {int(batch.rows[min(args.row, len(batch) - 1)])}: trained tokens marked")
    pieces = tok._core.decode(shown["input_ids"].tolist(), per_token=True)
    color = sys.stdout.isatty() and not args.no_color
    print(render_mask(pieces, shown["labels"].tolist(), color))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatmask", description="Chat conversations to training arrays.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tokenize the built-in demo conversations (offline) and show one row")
    demo.add_argument("--mode", default="all", choices=["last", "all", "multistep"])
    demo.add_argument("--row", type=int, default=0)
    demo.add_argument("--no-color", action="store_true")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
