"""The HTML view: a self-contained page, one span per token (hover: id and label), a block per
turn, legend and counts. The style sheet is ``show.css`` beside this module (package data),
inlined into the page."""

from __future__ import annotations

import html
import re
from functools import lru_cache
from typing import Sequence

from .tokens import is_special

# A new block starts at each turn-opening special token.
_TURN_START = re.compile(r"start|\[INST\]|^<\|(?:user|assistant|system|tool)\|>$", re.IGNORECASE)


@lru_cache(maxsize=1)
def stylesheet() -> str:
    from importlib.resources import files

    return files(__package__).joinpath("show.css").read_text(encoding="utf-8")


def _badge(index: Sequence[int], roles: Sequence[str]) -> str:
    """The role badge of a block: the message most of its tokens belong to (none: template text)."""
    owned = [i for i in index if i >= 0]
    if not owned:
        return ""
    message = max(set(owned), key=owned.count)
    role = roles[message] if 0 <= message < len(roles) else "?"
    return f'<span class="badge" title="message {message}">{html.escape(role)} #{message}</span>'


def render_html(
    pieces: Sequence[str],
    ids: Sequence[int],
    labels: Sequence[int],
    specials: set[str],
    title: str,
    *,
    message_index: Sequence[int] | None = None,
    roles: Sequence[str] = (),
    differs: Sequence[bool] | None = None,
    span_labels: Sequence[int] | None = None,
    warning: str | None = None,
) -> str:
    """One span per token (class ``tok``; hover: id and label), a block per turn with a role badge
    from `message_index`, tokens whose label differs from the span-based labels marked
    (class ``differs``), and `warning` on top."""
    blocks: list[list[str]] = [[]]
    block_index: list[list[int]] = [[]]
    for k, (piece, token_id, label) in enumerate(zip(pieces, ids, labels)):
        special = is_special(piece, specials)
        if special and _TURN_START.search(piece) and blocks[-1]:
            blocks.append([])
            block_index.append([])
        differ = bool(differs is not None and differs[k])
        classes = ["tok", "trained" if label != -100 else "masked"] + (["special"] if special else [])
        classes += ["differs"] if differ else []
        hover = f"id {int(token_id)}, label {int(label)}"
        if message_index is not None:
            hover += f", message {int(message_index[k])}"
            block_index[-1].append(int(message_index[k]))
        if differ and span_labels is not None:
            hover += f", span label {int(span_labels[k])}"
        text = html.escape(piece).replace("\n", '<span class="nl">↵</span>\n')
        blocks[-1].append(f'<span class="{" ".join(classes)}" title="{html.escape(hover)}">{text}</span>')
    trained = sum(1 for label in labels if label != -100)
    body = "\n".join(
        f'<div class="turn">{_badge(index, roles) if message_index is not None else ""}{"".join(b)}</div>'
        for b, index in zip(blocks, block_index)
        if b
    )
    warn = f'<p class="warning" role="alert">{html.escape(warning)}</p>\n' if warning else ""
    differ_legend = (
        '<span class="differs">differs from span labels</span>' if differs is not None and any(differs) else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{stylesheet()}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{warn}<p class="legend">Legend: <span class="trained">trained</span><span class="masked">masked (-100)</span><span class="special">special token</span>{differ_legend}<span class="nl">↵</span> newline; hover a token for its id and label; a new block starts at each turn-opening special token, its badge names the message it holds.</p>
<p class="counts">{len(ids)} tokens, {trained} trained</p>
<div class="tokens">
{body}
</div>
</body>
</html>
"""
