"""How chatmask's time grows with the input: message size, number of messages, nesting depth.

Times only chatmask (the reference's all-turns mode is itself quadratic in the number of turns),
one thread, the median of --repeats runs, and prints time against size with the ratio to the
previous row: a ratio near the size ratio (2x here) is linear, near its square (4x) quadratic.
The tests never assert timings; this script is for looking.

    python benches/scaling.py [--tokenizer DIR | --fixture NAME] [--repeats 3] [--max-messages 4000]

Without --tokenizer/--fixture it uses the built-in demo tokenizer (offline, ChatML template).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import chatmask  # noqa: E402

PARAGRAPH = "The quick brown fox jumps over the lazy dog. 0123456789 ünïcødé 日本語 🙂\n"
DATE = {"date_string": "26 Jul 2024"}


def load(args) -> chatmask.ChatTokenizer:
    if args.tokenizer:
        return chatmask.ChatTokenizer.from_pretrained(args.tokenizer, verify=0)
    if args.fixture:
        import _parity

        tok = _parity.oracle().load_tokenizer(args.fixture)
        return chatmask.ChatTokenizer.from_transformers(tok, verify=0)
    return chatmask.demo.demo_tokenizer()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def alternating(n: int):
    chat = []
    for i in range(n // 2):
        chat += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    return chat


def nested(depth: int):
    x = "v"
    for i in range(depth):
        x = {"k": x, "i": i}
    return x


def table(title: str, unit: str, rows) -> None:
    print(f"\n{title}")
    print(f"  {unit:>12} {'seconds':>10} {'x prev':>8}")
    prev = None
    for size, seconds in rows:
        ratio = f"{seconds / prev:8.2f}" if prev else " " * 8
        print(f"  {size:>12,} {seconds:10.4f} {ratio}", flush=True)
        prev = seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", help="a local tokenizer directory")
    ap.add_argument("--fixture", help="a ../shared fixture tokenizer name (needs transformers)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-messages", type=int, default=4000)
    ap.add_argument("--max-mb", type=int, default=8)
    args = ap.parse_args(argv)
    tok = load(args)
    print(f"chatmask {chatmask.__version__}, render backend {tok.render_backend}, one thread")

    for mode in ("last", "multistep", "all"):
        rows = []
        mb = 1
        while mb <= args.max_mb:
            big = (PARAGRAPH * (mb * 1_000_000 // len(PARAGRAPH) + 1))[: mb * 1_000_000]
            chat = [{"role": "user", "content": "Repeat this back."}, {"role": "assistant", "content": big}]
            rows.append(
                (len(big.encode()), timed(lambda: tok.tokenize_for_trainer(chat, mode=mode, **DATE), args.repeats))
            )
            mb *= 2
        table(f"one long assistant message, mode={mode}", "bytes", rows)

    for mode in ("last", "multistep", "all"):
        rows = []
        n = 250
        while n <= args.max_messages:
            chat = alternating(n)
            rows.append((n, timed(lambda: tok.tokenize_for_trainer(chat, mode=mode, **DATE), args.repeats)))
            n *= 2
        table(f"alternating user/assistant messages, mode={mode}", "messages", rows)

    rows = []
    n = 250
    while n <= args.max_messages:
        chat = alternating(n)
        rows.append((n, timed(lambda: tok.apply_chat_template(chat, tokenize=False, **DATE), args.repeats)))
        n *= 2
    table("one render of the whole chat (for comparison)", "messages", rows)

    rows = []
    for depth in (16, 32, 64, 128, 250):
        chat = [
            {"role": "user", "content": "call"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": nested(depth)}}],
            },
        ]
        try:
            rows.append((depth, timed(lambda: tok.tokenize_for_trainer(chat, mode="all", **DATE), args.repeats)))
        except chatmask.ChatMaskError as e:
            print(f"  depth {depth}: {e}")
    table("nested tool arguments, mode=all", "depth", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
