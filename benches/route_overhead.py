"""Per-call cost of a short `apply_chat_template`: how much is routing, how much is rendering.

    python benches/route_overhead.py [TOKENIZER_DIR] [--calls N]

Times a 2-message conversation through `apply_chat_template` (text and ids), and the routing
step alone (`_route`), on a fixture tokenizer (default ../shared/fixtures/tokenizers/qwen3).
Run it against two checkouts to compare (the README quotes one such run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import chatmask

CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]


def per_call(fn, calls: int) -> float:
    for _ in range(min(calls, 200)):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer", nargs="?", default=str(here.parent.parent / "shared/fixtures/tokenizers/qwen3"))
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    tok = chatmask.ChatTokenizer.from_pretrained(args.tokenizer, verify=0)
    source = tok._core.template_source()
    rows = [
        ("apply_chat_template(tokenize=False)", lambda: tok.apply_chat_template(CHAT, tokenize=False)),
        ("apply_chat_template(tokenize=True)", lambda: tok.apply_chat_template(CHAT)),
        ("routing only (_route)", lambda: tok._route(CHAT, None, {"tools": None, "documents": None})),
        ("core render only", lambda: tok._core.render(CHAT, chat_template=source)),
    ]
    print(f"chatmask {chatmask.__file__}, template {len(source):,} chars, {args.calls} calls each")
    for name, fn in rows:
        print(f"  {name:40s} {per_call(fn, args.calls):8.1f} us/call")


if __name__ == "__main__":
    main()
