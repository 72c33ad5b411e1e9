"""Differential parity of the drop-in against the reference (atropos' code on transformers 5).

Every fixture tokenizer x every conversation file; all three functions, finish_reason "" and
"length", include_messages both ways; tokens and masks compared element by element, and
exceptions on the same rows. CI runs the first CHATMASK_PARITY_ROWS (default 200) rows of each
file; ``pytest -m slow`` runs every row.
"""

from __future__ import annotations

import functools
import os

import pytest
from conftest import PARITY_TOTALS, conversation_file_names, fixture_names, require_shared

ROWS = int(os.environ.get("CHATMASK_PARITY_ROWS", "200"))


@functools.lru_cache(maxsize=None)
def reference_tokenizer(name: str):
    import _parity

    return _parity.oracle().load_tokenizer(name)


def _check(name: str, file: str, limit: int | None) -> None:
    import _parity

    require_shared("reference", "oracle.py")
    path = require_shared("fixtures", "conversations", file)
    require_shared("fixtures", "tokenizers", name)
    tally = _parity.compare_file(reference_tokenizer(name), name, path, limit)
    PARITY_TOTALS["cases"] += tally.cases
    PARITY_TOTALS["tokens_compared"] += tally.tokens_compared
    PARITY_TOTALS["both_raised"] += tally.both_raised
    PARITY_TOTALS["mismatches"] += len(tally.mismatches)
    assert tally.cases > 0, "nothing was compared"
    assert not tally.mismatches, "\n".join(tally.mismatches[:20])


@pytest.mark.parametrize("file", conversation_file_names())
@pytest.mark.parametrize("name", fixture_names())
def test_parity_first_rows(name: str, file: str) -> None:
    _check(name, file, ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("file", conversation_file_names())
@pytest.mark.parametrize("name", fixture_names())
def test_parity_every_row(name: str, file: str) -> None:
    _check(name, file, None)
