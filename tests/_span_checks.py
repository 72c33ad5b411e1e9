"""Checks of span-based labels on real tokenizers and conversations, independent of how the
core derives them. Used by tests/test_policy_fixtures.py and runnable on the whole corpus:

    python tests/_span_checks.py [--limit N] [--tokenizers a,b]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _parity import TOKENIZERS_DIR, conversation_files, fixture_tokenizers, template_kwargs  # noqa: E402

import chatmask  # noqa: E402
from chatmask import ChatTokenizer  # noqa: E402


@dataclass
class SpanTally:
    rows: int = 0
    template_raised: int = 0
    tokens: int = 0
    field_chars_checked: int = 0
    methods: collections.Counter = field(default_factory=collections.Counter)
    #: trained template text by where it sits in its message: opener, between, closer, end token
    template_text: collections.Counter = field(default_factory=collections.Counter)
    straddling: int = 0
    positions_from_offsets: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, other: SpanTally) -> None:
        for name in (
            "rows",
            "template_raised",
            "tokens",
            "field_chars_checked",
            "straddling",
            "positions_from_offsets",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.methods.update(other.methods)
        self.template_text.update(other.template_text)
        self.problems.extend(other.problems)


def special_token_ids(tokenizer_dir: Path) -> set[int]:
    """Ids of the added tokens tokenizer.json marks special, read from the file itself."""
    with open(tokenizer_dir / "tokenizer.json", encoding="utf-8") as f:
        return {t["id"] for t in json.load(f).get("added_tokens", []) if t.get("special")}


def check_row(
    tok: ChatTokenizer, messages: list, tally: SpanTally, where: str, special_ids: set[int], **kwargs
) -> None:
    """Default policy (assistant messages and their end tokens) on one row:

    1. every character of every field (content, reasoning, tool call) of an assistant message
       is covered by a trained token;
    2. no trained token touches a field of another message, except counted straddling tokens;
    3. every token over a field of message m has message_index m, and every trained token
       belongs to an assistant message;
    4. trained tokens outside every field lie between the neighbouring messages' fields and
       are tallied by where they sit (the text the model writes around its fields);
    5. token positions agree with the tokenizer's own offsets, and come from the tokens' own
       bytes except where a normalizer changed the text.
    """
    try:
        out = tok.tokenize(messages, **kwargs)
    except chatmask.TemplateError:
        tally.template_raised += 1
        return
    text, spans, method = tok._core.message_spans(messages, **kwargs)
    ids, positions, derived, offsets = tok._core.positions(text)
    problems = tally.problems
    if ids != out["input_ids"].tolist():
        problems.append(f"{where}: ids differ from encoding the render")
        return
    tally.rows += 1
    tally.tokens += len(ids)
    tally.methods[method] += 1
    tally.positions_from_offsets += not derived
    if not derived and unicodedata.normalize("NFC", text) == text:
        # Only a normalizer that changes the text (Qwen's NFC on non-NFC input) should stop the
        # tokens' own bytes from spelling it.
        problems.append(f"{where}: token positions not derived from the tokens on NFC text")
    if [tuple(p) for p in positions] != [tuple(o) for o in offsets]:
        problems.append(f"{where}: token positions differ from the tokenizer's offsets")
    roles = [m.get("role") for m in messages]
    assistant = {i for i, r in enumerate(roles) if r == "assistant"}
    labels, index = out["labels"], out["message_index"]
    trained = labels != -100
    starts = np.array([p[0] for p in positions], dtype=np.int64)
    ends = np.array([p[1] for p in positions], dtype=np.int64)
    covered = np.zeros(len(text) + 1, dtype=np.int32)
    for s, e in zip(starts[trained], ends[trained]):
        covered[s:e] = 1
    owner = np.full(len(text), -1, dtype=np.int64)
    for m, _kind, s, e in spans:
        owner[s:e] = m
        if m in assistant:
            tally.field_chars_checked += e - s
            if not covered[s:e].all():
                gap = s + int(np.argmin(covered[s:e]))
                problems.append(f"{where}: message {m} {_kind} char {gap} {text[gap : gap + 20]!r} not trained")
                return
    for t in np.nonzero(trained)[0]:
        s, e = starts[t], ends[t]
        owners = set(owner[s:e].tolist()) - {-1}
        if index[t] not in assistant:
            problems.append(f"{where}: trained token {t} has message_index {index[t]}")
            return
        if owners - {index[t]}:
            tally.straddling += 1
        if not owners:
            m = int(index[t])
            own = [(s2, e2) for m2, _k, s2, e2 in spans if m2 == m]
            others_before = [e2 for m2, _k, s2, e2 in spans if m2 != m and e2 <= min(x for x, _ in own)]
            others_after = [s2 for m2, _k, s2, e2 in spans if m2 != m and s2 >= max(y for _, y in own)]
            if (others_before and s < max(others_before)) or (others_after and e > min(others_after)):
                problems.append(f"{where}: trained template token {t} {text[s:e]!r} outside message {m}'s turn")
                return
            first, last = min(x for x, _ in own), max(y for _, y in own)
            kind = "opener" if e <= first else "closer" if s >= last else "between fields"
            if s >= last and int(ids[t]) in special_ids:
                kind = "end token"
            tally.template_text[kind] += 1
    for m, _kind, s, e in spans:
        over = (starts < e) & (ends > s) & (ends > starts)
        if not (index[over] == m).all():
            problems.append(
                f"{where}: tokens over message {m}'s {_kind} have message_index {set(index[over].tolist())}"
            )
            return


def check_corpus(tokenizer: str, limit: int | None = None) -> SpanTally:
    tok = ChatTokenizer.from_pretrained(TOKENIZERS_DIR / tokenizer)
    special_ids = special_token_ids(TOKENIZERS_DIR / tokenizer)
    tally = SpanTally()
    for path in conversation_files():
        with open(path, encoding="utf-8", newline="") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for i, row in enumerate(rows[:limit]):
            check_row(tok, row["messages"], tally, f"{tokenizer}/{path.name}:{i}", special_ids, **template_kwargs(row))
    return tally


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="rows per conversation file")
    ap.add_argument("--tokenizers", default=None)
    args = ap.parse_args(argv)
    names = args.tokenizers.split(",") if args.tokenizers else fixture_tokenizers()
    total = SpanTally()
    for name in names:
        t = check_corpus(name, args.limit)
        total.add(t)
        print(
            f"{name}: {t.rows} rows ({dict(t.methods)}), {t.template_raised} raised in the template, {t.tokens} tokens, "
            f"{t.field_chars_checked} assistant field chars covered, trained template text {dict(t.template_text)}, "
            f"{t.straddling} straddling, {t.positions_from_offsets} rows on tokenizer offsets, {len(t.problems)} problems"
        )
        for p in t.problems[:10]:
            print("   ", p)
    return 1 if total.problems else 0


if __name__ == "__main__":
    sys.exit(main())
