"""The batch engine: equal to per-row drop-in results, deterministic, errors per row."""

from __future__ import annotations

import numpy as np
import pytest

import chatmask
from chatmask.demo import demo_conversations, demo_tokenizer

MODES = ("last", "all", "multistep")


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


def demo_rows():
    rows = demo_conversations()
    return [r["messages"] for r in rows], [r.get("tools") for r in rows]


def per_row(tok, chats, mode, finish=""):
    out = []
    for i, chat in enumerate(chats):
        try:
            out.append((i, tok.tokenize_for_trainer(chat, mode=mode, finish_reason=finish)))
        except chatmask.ChatMaskError as e:
            out.append((i, e))
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 2])
def test_batch_equals_per_row_and_keeps_good_rows(tok, mode, threads):
    chats, _ = demo_rows()
    chats = chats * 40  # enough rows to spread over threads and chunks
    batch = tok.tokenize_batch(chats, mode=mode, num_threads=threads, on_error="skip")
    expected = per_row(tok, chats, mode)
    good = [(i, r) for i, r in expected if isinstance(r, dict)]
    bad = [(i, r) for i, r in expected if not isinstance(r, dict)]
    assert batch.rows.tolist() == [i for i, _ in good]
    assert batch.to_list() == [r for _, r in good]
    assert [row for row, _ in batch.errors] == [i for i, _ in bad]
    assert all(str(e) == msg for (_, e), (_, msg) in zip(bad, batch.errors))
    assert batch.input_ids.dtype == np.int32 and batch.labels.dtype == np.int64
    assert len(batch.offsets) == len(batch) + 1 and batch.offsets[-1] == len(batch.input_ids)
    row0 = batch[0]
    assert row0["input_ids"].tolist() == good[0][1]["tokens"] and row0["labels"].tolist() == good[0][1]["masks"]


def test_on_error_raise_names_the_row(tok):
    chats, _ = demo_rows()
    with pytest.raises(chatmask.ConversationError, match=r"^row 7: ") as info:
        tok.tokenize_batch(chats, mode="all")
    assert info.value.row == 7


def test_bad_rows_are_reported_not_dropped(tok):
    chats = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "not a chat", [3]]
    batch = tok.tokenize_batch(chats, on_error="skip")
    assert batch.rows.tolist() == [0]
    assert [r for r, _ in batch.errors] == [1, 2]


def test_finish_reason_per_row():
    template = "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
    tok = chatmask.ChatTokenizer.from_parts(chatmask.demo.demo_tokenizer_json(), template, {"eos_token": "<|im_end|>"})
    chats = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 2
    batch = tok.tokenize_batch(chats, finish_reason=["length", None])
    a, b = batch.to_list()
    assert a == tok.tokenize_for_trainer(chats[0], finish_reason="length")
    assert b == tok.tokenize_for_trainer(chats[0])
    assert len(a["tokens"]) == len(b["tokens"]) - 1


def test_label_offsets_when_masks_outgrow_tokens():
    # The prefix render (with its generation prompt) is longer than the whole chat.
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|im_start|><|im_start|>{% endif %}"
    tok = chatmask.ChatTokenizer.from_parts(chatmask.demo.demo_tokenizer_json(), template)
    chats = [[{"role": "user", "content": "<|im_end|>"}, {"role": "assistant", "content": ""}]] * 2
    single = tok.tokenize_for_trainer(chats[0])
    assert len(single["masks"]) > len(single["tokens"])
    batch = tok.tokenize_batch(chats)
    assert batch.to_list() == [single, single]
    assert (batch.label_offsets != batch.offsets).any()


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint32"])
def test_ids_dtype(tok, dtype):
    chats, _ = demo_rows()
    batch = tok.tokenize_batch(chats[:3], ids_dtype=dtype)
    assert batch.input_ids.dtype == np.dtype(dtype)


def test_to_arrow_shares_buffers(tok):
    pa = pytest.importorskip("pyarrow")
    chats, _ = demo_rows()
    batch = tok.tokenize_batch(chats[:5])
    table = batch.to_arrow()
    assert table.num_rows == len(batch)
    assert table.column("input_ids").to_pylist() == [r["tokens"] for r in batch.to_list()]
    assert isinstance(table.column("labels").type, pa.ListType)
