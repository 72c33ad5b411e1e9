"""The ``chatmask`` command line: ``tokenize`` and ``show`` (see :mod:`chatmask.pipeline`), and ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from typing import Sequence

from ._tokenizer import MODES
from ._usage import UsageError
from .pipeline import TokenizeOptions, load_policy, run_tokenize
from .pipeline.options import ShowOptions, add_arguments, from_namespace
from .show import render_mask, run_show  # noqa: F401 - render_mask is re-exported for callers of the old CLI module


def _tokenize(args: argparse.Namespace) -> int:
    # --mode and the field options default to None so that giving one with --policy is caught
    # (run_tokenize fills in their declared defaults).
    policy = load_policy(args.policy) if args.policy is not None else None
    run_tokenize(from_namespace(TokenizeOptions, args, policy=policy))
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.input is not None and args.demo_row is not None:
        raise UsageError("give INPUT (with --row) or --demo-row, not both")
    policy = load_policy(args.policy) if getattr(args, "policy", None) is not None else None
    return run_show(from_namespace(ShowOptions, args, policy=policy))


def _demo(args: argparse.Namespace) -> int:
    """`chatmask tokenize` on the embedded demo conversations, then `chatmask show` on one row (offline)."""
    from .demo import demo_conversations

    try:
        import pyarrow  # noqa: F401 - the pipeline writes Parquet; numpy is the only hard dependency
    except ImportError:
        return _demo_without_pyarrow(args)
    with tempfile.TemporaryDirectory(prefix="chatmask-demo-") as tmp:
        source = os.path.join(tmp, "demo.jsonl")
        with open(source, "w", encoding="utf-8") as f:
            for row in demo_conversations():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        out = args.out if args.out is not None else os.path.join(tmp, "out")
        print(f"$ chatmask tokenize demo.jsonl -o {args.out or '<tmpdir>'} --tokenizer demo --mode {args.mode}")
        sys.stdout.flush()
        run_tokenize(TokenizeOptions(inputs=[source], outdir=out, tokenizer="demo", mode=args.mode))
        with open(os.path.join(out, "errors.jsonl"), encoding="utf-8") as f:
            for line in f:
                error = json.loads(line)
                print(f"  errors.jsonl: row {error['row']}: {error['error']}")
        print(f"\n$ chatmask show --tokenizer demo --demo-row {args.row} --mode {args.mode}")
        sys.stdout.flush()
        code = run_show(
            ShowOptions(tokenizer="demo", demo_row=args.row, mode=args.mode, html=args.html, no_color=args.no_color)
        )
        if args.out is None:
            print("\n(output written to a temporary directory and removed; pass --out DIR to keep it)")
        return code


def _demo_without_pyarrow(args: argparse.Namespace) -> int:
    """`pip install -e .` alone has no pyarrow: tokenize in memory instead of to Parquet, then show."""
    from .demo import demo_conversations, demo_tokenizer

    rows = demo_conversations()
    batch = demo_tokenizer().tokenize_batch([r["messages"] for r in rows], mode=args.mode, on_error="skip")
    trained = int((batch.labels != -100).sum())
    print("(pyarrow is not installed, so `chatmask tokenize` cannot write Parquet: pip install pyarrow;")
    print(" tokenizing the demo in memory instead)")
    print(
        f"demo: {len(rows)} conversations -> {len(batch)} rows, {len(batch.input_ids)} tokens ({trained} trained), "
        f"{len(batch.errors)} errors, mode={args.mode}"
    )
    for row, message in batch.errors:
        print(f"  row {row}: {message}")
    print(f"\n$ chatmask show --tokenizer demo --demo-row {args.row} --mode {args.mode}")
    sys.stdout.flush()
    return run_show(
        ShowOptions(tokenizer="demo", demo_row=args.row, mode=args.mode, html=args.html, no_color=args.no_color)
    )


def _paragraphs(*paragraphs: str) -> str:
    """Help text kept in paragraphs (RawDescriptionHelpFormatter), each wrapped."""
    return "\n\n".join(textwrap.fill(p, width=88) for p in paragraphs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatmask", description="Chat conversations to training arrays.")
    sub = parser.add_subparsers(dest="command", required=True)

    tok = sub.add_parser(
        "tokenize",
        help="tokenize JSONL/Parquet conversations into Parquet parts (resumable, nothing lost)",
        description=_paragraphs(
            "Tokenize JSONL (plain, .gz, .zst) or Parquet conversations into Parquet part files, errors.jsonl "
            "and manifest.json in OUTDIR. Every input row lands in exactly one part or errors.jsonl (or, under a "
            'policy with overflow "drop", dropped.jsonl): rows_in == rows_out + rows_failed + rows_dropped.',
            "Labels are span-based by default: a default chatmask.MaskPolicy (assistant turns and their end "
            "tokens) on --messages-field / --tools-field. --mode last|all|multistep uses the reference's "
            "prefix-count arithmetic instead, judges every row on the spans and flags the rows where it is wrong "
            "(columns reference_wrong, reference_causes; manifest.json reference_wrong counts them by cause; a "
            "summary line names them).",
            "Labels come from --policy FILE too, a JSON object of "
            'chatmask.MaskPolicy fields, e.g. {"roles_to_train": ["assistant"], "max_length": 4096, '
            '"overflow": "drop", "field_messages": "conversations"}. A policy replaces --mode, '
            "--finish-reason-field, --messages-field and --tools-field, and combining them with it is an error: "
            "the policy's field_messages / field_tools / field_system and its role and property mappings read "
            "each row as it is in the file (ShareGPT's from/value too). With a policy the parts gain "
            "message_index (list<int32> along input_ids; -1 for template text), span_method and truncated "
            'columns; rows longer than max_length under overflow "drop" go to dropped.jsonl; the policy is in '
            "manifest.json, and --resume refuses a different one.",
            "manifest.json always counts rows_with_control_tokens: output rows whose text held a control "
            "token's text such as <|im_start|>. That text becomes the control token, unless "
            "--sanitize-control-tokens (needs --policy) encodes it as text, as transformers 5 does.",
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(tok, TokenizeOptions)
    tok.set_defaults(func=_tokenize)

    show = sub.add_parser("show", help="print one conversation's tokens with trained/masked marked (or --html)")
    add_arguments(show, ShowOptions)
    show.set_defaults(func=_show)

    demo = sub.add_parser("demo", help="tokenize the built-in demo conversations (offline) and show one row")
    demo.add_argument("--mode", default="all", choices=[m for m in MODES if m != "generation"])
    demo.add_argument("--row", type=int, default=0, help="demo conversation to show")
    demo.add_argument("--out", default=None, metavar="DIR", help="keep the tokenize output in DIR")
    demo.add_argument("--html", default=None, metavar="FILE", help="also write the HTML view of the row")
    demo.add_argument("--no-color", action="store_true")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"chatmask {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (rerun with --resume to finish)" if args.command == "tokenize" else ""
        print(f"\nchatmask {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
