"""Rollouts built from the fixture conversations, for tests/test_rollout.py and benches/rollout.py.

The "sampled" ids of an assistant message are computed here independently of chatmask.rollout:
the tokens of the full render from the one covering the message's first field to its last
field's end (from ``message_spans`` and ``positions``), when a token boundary lies at the end. Non-canonical
ids split such tokens into two shorter vocabulary pieces that spell the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from _parity import conversation_files, template_kwargs

from chatmask import ChatTokenizer


@dataclass
class Region:
    message: int
    start: int  # token indices in the full render
    end: int
    ids: list[int]


def boundary(positions: list[tuple[int, int]], at: int) -> int | None:
    """The first token starting at or after character `at`, if no token covers both sides."""
    i = next((k for k, p in enumerate(positions) if p[0] >= at), len(positions))
    return i if i == 0 or positions[i - 1][1] <= at else None


def covering(positions: list[tuple[int, int]], at: int) -> int:
    """The token that starts at character `at` or covers it (Mistral's `▁Hello` also covers the
    template's space before the content), or the first token after it."""
    return next((k for k, p in enumerate(positions) if p[1] > at or p[0] >= at), len(positions))


def regions(tok: ChatTokenizer, messages: list[dict[str, Any]], **kwargs: Any) -> dict[int, Region]:
    """Each assistant message's text tokens in the full render, from the token covering its
    first field's start (messages without a boundary at their end, or without fields in the
    render, are left out)."""
    text, spans, _ = tok._core.message_spans(messages, **kwargs)
    ids, positions, _, _ = tok._core.positions(text)
    out = {}
    for k, m in enumerate(messages):
        fields = [(s, e) for message, _, s, e in spans if message == k]
        if m.get("role") != "assistant" or not fields:
            continue
        start = covering(positions, min(s for s, _ in fields))
        end = boundary(positions, max(e for _, e in fields))
        if end is not None and start <= end:
            out[k] = Region(k, start, end, list(ids[start:end]))
    return out


def fixture_rows(limit_per_file: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(row_id, row)` for the rows of every conversation file that have an assistant message
    after the first message."""
    for path in conversation_files():
        taken = 0
        with open(path, encoding="utf-8", newline="") as f:
            for i, line in enumerate(f):
                if limit_per_file is not None and taken >= limit_per_file:
                    break
                if not line.strip():
                    continue
                row = json.loads(line)
                if any(m.get("role") == "assistant" for m in row["messages"][1:]):
                    taken += 1
                    yield f"{path.name}:{i}", row


def rollout_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    return template_kwargs(row)


class Splitter:
    """Splits a token into two vocabulary tokens that spell the same bytes (None if none do)."""

    def __init__(self, tokenizer_json: str) -> None:
        spec = json.loads(tokenizer_json)
        vocab = spec["model"]["vocab"]
        # A list of (piece, score) for Unigram models; BPE and WordPiece map piece -> id.
        self._vocab: dict[str, int] = vocab if isinstance(vocab, dict) else {p: i for i, (p, _) in enumerate(vocab)}
        self._added = {t["id"] for t in spec.get("added_tokens", [])}
        self._pieces = {i: p for p, i in self._vocab.items() if i not in self._added}

    def is_added(self, token: int) -> bool:
        """An added token (special or not): what a server may return as the stop token."""
        return token in self._added

    def split(self, token: int) -> tuple[int, int] | None:
        piece = self._pieces.get(token)
        if piece is None or piece.startswith("<0x"):
            return None
        for j in range(len(piece) - 1, 0, -1):
            left, right = self._vocab.get(piece[:j]), self._vocab.get(piece[j:])
            if left is not None and right is not None:
                return left, right
        return None

    def non_canonical(self, ids: list[int], most: int = 3) -> tuple[list[int], int]:
        """`ids` with up to `most` tokens split; returns the ids and how many were split."""
        out: list[int] = []
        splits = 0
        for token in ids:
            pair = self.split(token) if splits < most else None
            if pair is None:
                out.append(token)
            else:
                out.extend(pair)
                splits += 1
        return out, splits
