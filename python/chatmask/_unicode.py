"""The running Python's Unicode case data, handed to the Rust core once per process.

Templates call `str.upper()`, `.title()`, `.casefold()` ... and Jinja2 runs them with this
Python's `unicodedata` (Python 3.11 has Unicode 14, 3.13 Unicode 15.1), while Rust's own tables
are of one fixed, newer version. So the core takes its case mappings from here: every code
point whose `upper`, `lower`, `title` (where it differs from `upper`) or `casefold` (where it
differs from `lower`) is not the identity, the characters with its Lowercase, Uppercase and
titlecase flags, and the code points Rust knows but this Python does not (unassigned here: not
printable, not a letter, no case).

Found by halving: a block of code points whose mapped text equals the text itself holds no
mapping, so only the few blocks with cased letters are split further (about 0.1 s in all, once
per process, at import).
"""

from __future__ import annotations

import sys
import unicodedata
from array import array
from collections.abc import Callable

_BLOCK = 512


def _code_points() -> str:
    """Every code point above ASCII, surrogates left out (they cannot be mapped or printed),
    built from UTF-32 in one step (a join of 1.1 million `chr` calls takes 4 times longer)."""
    points = array("I", range(0x80, 0xD800))
    points.extend(range(0xE000, sys.maxunicode + 1))
    return points.tobytes().decode("utf-32-le" if sys.byteorder == "little" else "utf-32-be")


def _differing(text: str, same: Callable[[int, int], bool]) -> list[str]:
    """The characters `text[i]` for which `same(i, i + 1)` is false, given that `same(lo, hi)`
    holds exactly when it holds for each character of the range."""
    found: list[str] = []
    stack = [(i, min(i + _BLOCK, len(text))) for i in range(0, len(text), _BLOCK)]
    stack.reverse()
    while stack:
        lo, hi = stack.pop()
        if same(lo, hi):
            continue
        if hi - lo == 1:
            found.append(text[lo])
            continue
        mid = (lo + hi) // 2
        stack.append((mid, hi))
        stack.append((lo, mid))
    return found


def case_tables(rust_known: str) -> dict[str, object]:
    """The tables `_core.install_unicode_tables` takes; `rust_known` is the text of the code
    points the core's own tables treat as assigned, cased or printable."""
    t = _code_points()
    upper = {c: c.upper() for c in _differing(t, lambda lo, hi: t[lo:hi].upper() == t[lo:hi])}
    lower = {c: c.lower() for c in _differing(t, lambda lo, hi: t[lo:hi].lower() == t[lo:hi])}
    casefold = {c: c.casefold() for c in _differing(t, lambda lo, hi: t[lo:hi].casefold() == t[lo:hi].lower())}
    # Only a character with case has a titlecase mapping (the test suite checks every code point).
    title = {c: c.title() for c in upper.keys() | lower.keys() if c.title() != c.upper()}
    # The Lowercase/Uppercase/Lt flags behind islower(), isupper(), title() and swapcase():
    # "A" + run is upper exactly when no character of the run is lowercase or titlecase, and
    # "a" + run lower exactly when none is uppercase or titlecase.
    lower_or_title = set(_differing(t, lambda lo, hi: ("A" + t[lo:hi]).isupper()))
    upper_or_title = set(_differing(t, lambda lo, hi: ("a" + t[lo:hi]).islower()))
    titlecase = {c for c in lower_or_title & upper_or_title if unicodedata.category(c) == "Lt"}
    k = rust_known
    unknown = [c for c in _differing(k, lambda lo, hi: k[lo:hi].isprintable()) if unicodedata.category(c) == "Cn"]
    return {
        "upper": upper,
        "lower": lower,
        "title": title,
        "casefold": casefold,
        "unassigned": "".join(unknown),
        "is_lower": "".join(sorted(lower_or_title - titlecase)),
        "is_upper": "".join(sorted(upper_or_title - titlecase)),
        "is_title": "".join(sorted(titlecase)),
        "version": unicodedata.unidata_version,
    }


_installed = False


def install() -> None:
    """Installs this Python's tables in the core (once; later calls are free)."""
    global _installed
    if _installed:
        return
    from . import _core

    _core.install_unicode_tables(case_tables(_core.unicode_known_text()))
    _installed = True
