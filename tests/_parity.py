"""Differential comparison of chatmask against the reference oracle in ../shared.

Used by the parity tests and runnable on its own for the full corpus:

    python tests/_parity.py [--limit N] [--tokenizers a,b] [--files x.jsonl,...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

SHARED = Path(os.environ.get("CHATMASK_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
REFERENCE_DIR = SHARED / "reference"
TOKENIZERS_DIR = SHARED / "fixtures" / "tokenizers"
CONVERSATIONS_DIR = SHARED / "fixtures" / "conversations"

MODES = ("last", "all", "multistep")
FINISH_REASONS = ("", "length")


def oracle():
    """The reference oracle module (imports transformers)."""
    if str(REFERENCE_DIR) not in sys.path:
        sys.path.insert(0, str(REFERENCE_DIR))
    import oracle as _oracle  # noqa: PLC0415

    return _oracle


def fixture_tokenizers() -> list[str]:
    return sorted(p.name for p in TOKENIZERS_DIR.iterdir() if (p / "tokenizer.json").exists())


def conversation_files() -> list[Path]:
    return sorted(CONVERSATIONS_DIR.glob("*.jsonl"))


def template_kwargs(row: dict) -> dict:
    kwargs = {"date_string": oracle().DATE_STRING}
    if row.get("tools"):
        kwargs["tools"] = row["tools"]
    return kwargs


@dataclass
class Tally:
    cases: int = 0
    tokens_compared: int = 0
    both_raised: int = 0
    mismatches: list[str] = field(default_factory=list)

    def add(self, other: "Tally") -> None:
        self.cases += other.cases
        self.tokens_compared += other.tokens_compared
        self.both_raised += other.both_raised
        self.mismatches.extend(other.mismatches)


def _run(fn):
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints "bad token"
            return fn(), None
    except Exception as e:  # both sides may raise; that is compared, not hidden
        return None, e


def raised_alike(want: Exception, got: Exception) -> str | None:
    """None if chatmask raised the counterpart of the reference's exception, else why not.

    A template error must be a chatmask TemplateError with the template's message; the reference's
    own failures (empty prefix, missing role, numpy broadcast) must be ConversationErrors.
    """
    import jinja2

    import chatmask

    if isinstance(want, jinja2.TemplateError):
        if not isinstance(got, chatmask.TemplateError):
            return f"reference raised a template error {want!r}, chatmask {got!r}"
        if str(want) and str(want) not in str(got):
            return f"template message {str(want)!r} not in {str(got)!r}"
        return None
    if not isinstance(got, chatmask.ConversationError):
        return f"reference raised {want!r}, chatmask {got!r}"
    if isinstance(want, ValueError) and "empty conversation" in str(want) and str(want) != str(got):
        return f"message {str(got)!r} != {str(want)!r}"
    return None


def compare_row(tok, name: str, row_id: str, row: dict, modes=MODES, finish_reasons=FINISH_REASONS) -> Tally:
    """Compare every mode and finish_reason on one row, element by element."""
    import chatmask

    ref = oracle()
    tally = Tally()
    chat = row["messages"]
    kwargs = template_kwargs(row)
    for mode, finish in itertools.product(modes, finish_reasons):
        include = tally.cases % 2 == 1  # alternate include_messages over the cases
        want, want_err = _run(
            lambda: ref.reference(tok, chat, mode=mode, finish_reason=finish, include_messages=include, **kwargs)
        )
        if mode == "multistep":
            call = lambda: chatmask.tokenize_for_trainer_multistep(  # noqa: E731
                tok, chat, include_messages=include, finish_reason=finish, **kwargs
            )
        else:
            call = lambda: chatmask.tokenize_for_trainer(  # noqa: E731
                tok,
                chat,
                include_messages=include,
                train_on_all_assistant_turns=(mode == "all"),
                finish_reason=finish,
                **kwargs,
            )
        got, got_err = _run(call)
        tally.cases += 1
        where = f"{name} {row_id} mode={mode} finish={finish!r}"
        if want_err is not None or got_err is not None:
            if want_err is None or got_err is None:
                tally.mismatches.append(f"{where}: reference raised {want_err!r}, chatmask raised {got_err!r}")
            elif (why := raised_alike(want_err, got_err)) is not None:
                tally.mismatches.append(f"{where}: both raised, but {why}")
            else:
                tally.both_raised += 1
            continue
        if set(want) != set(got):
            tally.mismatches.append(f"{where}: keys {sorted(want)} != {sorted(got)}")
            continue
        if include and got["messages"] is not chat:
            tally.mismatches.append(f"{where}: messages is not the input chat")
        for key in ("tokens", "masks"):
            w, g = want[key], got[key]
            if type(g) is not list or any(type(x) is not int for x in g):
                tally.mismatches.append(f"{where}: {key} is not a list of int")
            tally.tokens_compared += len(w)
            if len(w) != len(g):
                tally.mismatches.append(f"{where}: len({key}) {len(g)} != reference {len(w)}")
                continue
            bad = [i for i, (a, b) in enumerate(zip(w, g)) if a != b]
            if bad:
                tally.mismatches.append(f"{where}: {key} differ at {len(bad)} positions, first {bad[0]}")
    return tally


def compare_file(tok, name: str, path: Path, limit: int | None) -> Tally:
    ref = oracle()
    tally = Tally()
    for i, row in enumerate(ref.read_conversations(path)):
        if limit is not None and i >= limit:
            break
        tally.add(compare_row(tok, name, row.get("id", f"{path.stem}-{i}"), row))
    return tally


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--files", default=None)
    args = ap.parse_args(argv)
    names = args.tokenizers.split(",") if args.tokenizers else fixture_tokenizers()
    files = [CONVERSATIONS_DIR / f for f in args.files.split(",")] if args.files else conversation_files()
    total = Tally()
    for name in names:
        tok = oracle().load_tokenizer(name)
        for path in files:
            t = compare_file(tok, name, path, args.limit)
            total.add(t)
            print(
                f"{name:18} {path.name:28} cases={t.cases:6} tokens={t.tokens_compared:10} "
                f"both_raised={t.both_raised:5} mismatches={len(t.mismatches)}",
                flush=True,
            )
            for m in t.mismatches[:5]:
                print("   ", m, flush=True)
    print(
        f"TOTAL cases={total.cases} tokens_compared={total.tokens_compared} "
        f"both_raised={total.both_raised} mismatches={len(total.mismatches)}"
    )
    return 1 if total.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
