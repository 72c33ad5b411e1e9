"""On the real fixture tokenizers: loading matches transformers, and the batch engine equals the
per-row drop-in on the corpus (first CHATMASK_PARITY_ROWS rows per file; every row under -m slow)."""

from __future__ import annotations

import functools
import itertools
import os

import pytest
from conftest import fixture_names, require_shared

import chatmask

ROWS = int(os.environ.get("CHATMASK_PARITY_ROWS", "200"))
MODES = ("last", "all", "multistep")


@functools.lru_cache(maxsize=None)
def hf(name):
    import _parity

    require_shared("fixtures", "tokenizers", name)
    return _parity.oracle().load_tokenizer(name)


def corpus(limit):
    import _parity

    rows = []
    for path in _parity.conversation_files():
        for i, row in enumerate(_parity.oracle().read_conversations(path)):
            if limit is not None and i >= limit:
                break
            rows.append(row)
    return rows


@pytest.mark.parametrize("name", fixture_names())
def test_from_pretrained_matches_transformers(name):
    path = require_shared("fixtures", "tokenizers", name)
    tok = hf(name)
    ours = chatmask.ChatTokenizer.from_pretrained(path)
    theirs = chatmask.ChatTokenizer.from_transformers(tok)
    assert ours._core.template_source() == tok.chat_template
    assert ours.special_tokens == tok.special_tokens_map
    assert ours.eos_token_id == theirs.eos_token_id == tok.eos_token_id
    compared = 0
    for row in corpus(20):
        kw = {"date_string": "26 Jul 2024", "tools": row.get("tools")}
        try:
            text = tok.apply_chat_template(row["messages"], tokenize=False, **kw)
        except Exception:
            continue
        want = tok.encode(text, add_special_tokens=False)
        assert ours.encode(text) == want and theirs.encode(text) == want
        assert ours.apply_chat_template(row["messages"], tokenize=False, **kw) == text
        compared += 1
    assert compared >= 20


def _batch_equals_dropin(name, mode, limit):
    tok = hf(name)
    core = chatmask.ChatTokenizer.from_transformers(tok)
    rows = corpus(limit)
    finish = ["length" if i % 3 == 0 else "" for i in range(len(rows))]
    batch = core.tokenize_batch(rows, mode=mode, finish_reason=finish, on_error="skip", date_string="26 Jul 2024")
    got = dict(zip(batch.rows.tolist(), batch.to_list()))
    errors = dict(batch.errors)
    compared = 0
    for i, row in enumerate(rows):
        try:
            want = core.tokenize_for_trainer(
                row["messages"], mode=mode, finish_reason=finish[i], tools=row.get("tools"), date_string="26 Jul 2024"
            )
        except chatmask.ChatMaskError as e:
            assert errors.get(i) == str(e), f"row {i}"
            continue
        assert got[i] == want, f"row {i}"
        compared += 1
    assert compared > 0 and len(got) + len(errors) == len(rows)


@pytest.mark.parametrize("name, mode", list(itertools.product(fixture_names(), MODES)))
def test_batch_equals_dropin_first_rows(name, mode):
    _batch_equals_dropin(name, mode, ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", list(itertools.product(fixture_names(), MODES)))
def test_batch_equals_dropin_every_row(name, mode):
    _batch_equals_dropin(name, mode, None)
