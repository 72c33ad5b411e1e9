"""The terminal view: trained tokens green, masked ones dim, special tokens in reverse video;
without colour trained spans in ``[[...]]`` and special tokens in ``⟦...⟧``; newlines as ``↵``
plus a real newline."""

from __future__ import annotations

from typing import Sequence

from .tokens import is_special

GREEN, DIM, REVERSE, UNDERLINE, RESET = "\033[32m", "\033[2m", "\033[7m", "\033[4;31m", "\033[0m"
DIFFERS = "‼"  # after a token whose label differs from the span-based labels (without colour)


def render_mask(
    pieces: Sequence[str],
    labels: Sequence[int],
    color: bool,
    specials: set[str] | None = None,
    differs: Sequence[bool] | None = None,
    badges: dict[int, str] | None = None,
) -> str:
    """Each token's text; trained green (else in [[...]] spans), masked dim, specials reversed (else ⟦...⟧).

    `differs` marks tokens whose label differs from the span-based labels (red underline, else
    ``‼`` after the token); `badges` puts ``«role»`` before the token at each key (the first
    token of a message). Without colour a ``[[`` span closes before each newline and reopens
    after it, so every printed line reads on its own.
    """
    specials = specials if specials is not None else set()
    badges = badges or {}
    out: list[str] = []
    in_span = False
    for k, (piece, label) in enumerate(zip(pieces, labels)):
        trained = label != -100
        special = is_special(piece, specials)
        text = piece.replace("\r", "␍")
        differ = bool(differs is not None and differs[k])
        if k in badges:
            if in_span:
                out.append("]]")
                in_span = False
            out.append(f"«{badges[k]}»")
        if color:
            style = (GREEN if trained else DIM) + (REVERSE if special else "") + (UNDERLINE if differ else "")
            lines = text.split("\n")
            shown = [line + "↵" for line in lines[:-1]] + [lines[-1]]
            out.append("\n".join(f"{style}{line}{RESET}" if line else "" for line in shown))
            continue
        if special:
            text = f"⟦{text}⟧"
        if differ:
            text += DIFFERS
        lines = text.split("\n")
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            content = line if last else line + "↵"
            if content:
                if trained and not in_span:
                    out.append("[[")
                    in_span = True
                elif not trained and in_span:
                    out.append("]]")
                    in_span = False
                out.append(content)
            if not last:
                if in_span:
                    out.append("]]")
                    in_span = False
                out.append("\n")
    if in_span:
        out.append("]]")
    return "".join(out)


def legend(color: bool, differs: bool = False) -> str:
    if color:
        extra = f"  {UNDERLINE}differs from span labels{RESET}" if differs else ""
        return f"legend: {GREEN}trained{RESET}  {DIM}masked (-100){RESET}  {REVERSE}special{RESET}  ↵ newline  «role» message{extra}"
    extra = f"  {DIFFERS} differs from span labels" if differs else ""
    return f"legend: [[trained]]  masked (-100) unmarked  ⟦special⟧  ↵ newline  «role» message{extra}"
