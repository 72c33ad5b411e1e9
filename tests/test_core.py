"""The core suite: runs in a fresh clone without ../shared.

It uses the demo tokenizers the package trains itself (byte-level BPE and Metaspace with
`prepend_scheme: first`) and the demo template, and compares chatmask with the reference's
algorithm written out below on transformers' own rendering and the Python `tokenizers` encoder.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import chatmask
from chatmask.demo import demo_chat_template, demo_conversations, demo_tokenizer, demo_tokenizer_json

KINDS = ("bytelevel", "metaspace")
UNMASKED_ROLES = ("assistant", "agent")


def hf_tokenizer(kind: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(demo_tokenizer_json(kind)), eos_token="<|im_end|>"
    )
    tok.chat_template = demo_chat_template()
    return tok


def reference(tok, chat, mode, finish_reason="", **kw):
    """atropos' tokenize_for_trainer / _multistep, written out (numpy stands in for torch)."""

    def apply(c, add_generation_prompt=False):
        return tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt, return_dict=False, **kw)

    tokens = apply(chat)
    if mode == "multistep":
        labels = np.ones(len(tokens), dtype=np.int64) * -100
        last = next((i for i in range(len(chat) - 1, -1, -1) if chat[i]["role"] in UNMASKED_ROLES), -1)
        if last != -1:
            start, end = len(apply(chat[:last], True)), len(apply(chat[: last + 1]))
            if 0 <= start < end <= len(tokens):
                labels[start:end] = np.array(tokens[start:end], dtype=np.int64)
        masks = labels.tolist()
        if finish_reason == "length" and tokens and tokens[-1] == tok.eos_token_id:
            tokens, masks = tokens[:-1], masks[:-1]
        return {"tokens": tokens, "masks": masks}
    if mode == "last":
        prefix_len = len(apply(chat[:-1], True))
        masks = [-100] * prefix_len + tokens[prefix_len:]
    else:
        arr = np.ones(len(tokens), dtype=np.int64) * -100
        for i, msg in enumerate(chat):
            if msg["role"] in UNMASKED_ROLES:
                start, unmasked = len(apply(chat[:i], True)), apply(chat[: i + 1])
                arr[start : len(unmasked)] = np.array(unmasked[start:])
        masks = arr.tolist()
    if finish_reason == "length" and tokens[-1] == tok.eos_token_id:
        tokens, masks = tokens[:-1], masks[:-1]
    return {"tokens": tokens, "masks": masks}


def extra_conversations():
    """Shapes the demo rows lack: a trailing user turn, agent role, tool turns, single message."""
    return [
        [{"role": "user", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "agent", "content": "b"}, {"role": "user", "content": "c"}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
        [{"role": "user", "content": "x", "name": None}, {"role": "assistant", "content": "y", "reasoning": "z"}],
    ]


@pytest.mark.parametrize("kind", KINDS)
def test_dropin_equals_reference_algorithm_on_demo(kind):
    tok = hf_tokenizer(kind)
    rows = [(r["messages"], r.get("tools")) for r in demo_conversations()] + [(c, None) for c in extra_conversations()]
    compared = raised = 0
    for (chat, tools), mode, finish in itertools.product(rows, ("last", "all", "multistep"), ("", "length")):
        kw = {"tools": tools} if tools else {}
        try:
            want = reference(tok, chat, mode, finish, **kw)
        except Exception:
            with pytest.raises(chatmask.ChatMaskError):
                run_dropin(tok, chat, mode, finish, **kw)
            raised += 1
            continue
        got = run_dropin(tok, chat, mode, finish, **kw)
        assert got == want, (kind, mode, finish, chat)
        compared += len(want["tokens"])
    assert compared > 1000 and raised > 0


def run_dropin(tok, chat, mode, finish, **kw):
    if mode == "multistep":
        return chatmask.tokenize_for_trainer_multistep(tok, chat, finish_reason=finish, **kw)
    return chatmask.tokenize_for_trainer(
        tok, chat, train_on_all_assistant_turns=mode == "all", finish_reason=finish, **kw
    )


@pytest.mark.parametrize("kind", KINDS)
def test_render_equals_transformers(kind):
    tok, ours = hf_tokenizer(kind), demo_tokenizer(kind)
    for row in demo_conversations():
        for n, gen in itertools.product(range(1, len(row["messages"]) + 1), (False, True)):
            chat = row["messages"][:n]
            want = tok.apply_chat_template(chat, tools=row.get("tools"), add_generation_prompt=gen, tokenize=False)
            assert (
                ours.apply_chat_template(chat, tools=row.get("tools"), add_generation_prompt=gen, tokenize=False)
                == want
            )
            assert ours.apply_chat_template(chat, tools=row.get("tools"), add_generation_prompt=gen) == tok.encode(
                want, add_special_tokens=False
            )


def test_include_messages_returns_the_input_object():
    chat = demo_conversations()[1]["messages"]
    out = chatmask.tokenize_for_trainer(demo_tokenizer(), chat, include_messages=True)
    assert set(out) == {"tokens", "masks", "messages"} and out["messages"] is chat
    assert set(chatmask.tokenize_for_trainer_multistep(demo_tokenizer(), chat)) == {"tokens", "masks"}


def test_core_is_cached_per_tokenizer_and_template():
    from chatmask.dropin import core_for

    tok = hf_tokenizer("bytelevel")
    first = core_for(tok)
    assert core_for(tok) is first
    tok.chat_template = demo_chat_template() + "{{ '' }}"
    assert core_for(tok) is not first


def test_import_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, chatmask; chatmask.demo.demo_tokenizer(); print('transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", "import chatmask.demo;" + code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
