"""What both views need about a row's tokens: their display text and which ones are special."""

from __future__ import annotations

from typing import Sequence

from .._tokenizer import ChatTokenizer
from ..errors import ChatMaskError


def special_token_texts(tok: ChatTokenizer, has_tools: bool = False) -> set[str]:
    """Texts of the special tokens, from the core's own tables: the named special tokens and the
    control tokens of the template in use (the added tokens marked special, and the added tokens
    the template writes)."""
    texts: set[str] = set()
    for value in tok.special_tokens.values():
        if isinstance(value, str):
            texts.add(value)
        elif isinstance(value, (list, tuple)):
            texts.update(v for v in value if isinstance(v, str))
    try:
        texts.update(tok._core.control_tokens(None, has_tools))
    except ChatMaskError:
        pass  # no template: the named special tokens only
    return texts


def is_special(piece: str, specials: set[str]) -> bool:
    return piece in specials


def display_pieces(tok: ChatTokenizer, ids: Sequence[int]) -> list[str]:
    """One string per token, with a character split over several byte-level tokens shown whole.

    Decoding such tokens one at a time gives U+FFFD halves; the joint decode of up to four tokens
    is put on the first and the others show as empty, so every token keeps its own label.
    """
    pieces = [str(p) for p in tok._core.decode(list(ids), per_token=True)]
    i = 0
    while i < len(pieces):
        if "\ufffd" in pieces[i]:
            for j in range(i + 2, min(i + 5, len(pieces) + 1)):
                joint = str(tok._core.decode(list(ids[i:j])))
                if "\ufffd" not in joint:
                    pieces[i:j] = [joint] + [""] * (j - i - 1)
                    i = j - 1
                    break
        i += 1
    return pieces
