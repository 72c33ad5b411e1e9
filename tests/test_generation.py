"""`{% generation %}` spans and assistant masks against transformers.

Our spans and text must equal transformers' AssistantTracker exactly. Our mask marks every token
with a character in a span; transformers' mask equals that except where its two known bugs fire
(a span whose start maps to no token stops the marking of all later spans; an end token of 0 marks
to the end). Each such row is counted and checked to be explained by those bugs.
"""

from __future__ import annotations

import os

import pytest
from conftest import require_shared

import chatmask

GEN_FIXTURES = ["llama3-gen", "mistral-7b-v0.3-gen", "qwen3-gen", "smollm3-on-qwen3"]
ROWS = int(os.environ.get("CHATMASK_GENERATION_ROWS", "60"))


def transformers_spans(tok, chat, **kw):
    from transformers.utils.chat_template_utils import render_jinja_template

    chat = [{k: v for k, v in m.items() if v is not None} for m in chat]
    rendered, indices = render_jinja_template(
        conversations=[chat],
        chat_template=tok.chat_template,
        return_assistant_tokens_mask=True,
        **{**tok.special_tokens_map, **kw},
    )
    return rendered[0], [tuple(x) for x in indices[0]]


def overlap_mask(offsets, spans):
    return [int(any(s < te and ts < e for s, e in spans if s < e)) for ts, te in offsets]


def buggy_mask(enc, n, spans):
    """transformers' loop, verbatim in behaviour."""
    mask = [0] * n
    for s, e in spans:
        start, end = enc.char_to_token(s), enc.char_to_token(e - 1)
        if start is None:
            break
        for t in range(start, end + 1 if end else n):
            mask[t] = 1
    return mask


@pytest.mark.parametrize("name", GEN_FIXTURES)
def test_generation_masks_match_transformers(name):
    import _parity

    require_shared("fixtures", "tokenizers", name)
    tok = _parity.oracle().load_tokenizer(name)
    core = chatmask.ChatTokenizer.from_transformers(tok)
    compared = bug_rows = 0
    for path in _parity.conversation_files():
        for i, row in zip(range(ROWS), _parity.oracle().read_conversations(path)):
            kw = {"date_string": "26 Jul 2024"}
            if row.get("tools"):
                kw["tools"] = row["tools"]
            try:
                text, spans = transformers_spans(tok, row["messages"], **kw)
            except Exception:
                with pytest.raises(chatmask.ChatMaskError):
                    core._core.render_with_spans(row["messages"], **kw)
                continue
            assert core._core.render_with_spans(row["messages"], **kw) == (text, spans), (path.name, i)
            theirs = tok.apply_chat_template(row["messages"], return_assistant_tokens_mask=True, return_dict=True, **kw)
            ours = core.apply_chat_template(row["messages"], return_assistant_tokens_mask=True, **kw)
            assert ours["input_ids"] == theirs["input_ids"]
            enc = tok(text, add_special_tokens=False)
            fixed = overlap_mask(enc.encodings[0].offsets, spans)
            assert ours["assistant_masks"] == fixed, (path.name, i)
            if theirs["assistant_masks"] != fixed:
                assert theirs["assistant_masks"] == buggy_mask(enc, len(enc.input_ids), spans)
                bug_rows += 1
            compared += 1
    assert compared > 100
    print(f"{name}: {compared} rows compared, {bug_rows} differ only by transformers' known bugs")


def _demo_hf(template, normalizer=None):
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(chatmask.demo.demo_tokenizer_json())
    if normalizer is not None:
        spec["normalizer"] = normalizer
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)))
    hf.chat_template = template
    return hf, chatmask.ChatTokenizer.from_parts(json.dumps(spec), template)


def _trained_text(tok, out):
    pieces = tok._core.decode(out["input_ids"], per_token=True)
    return "".join(p for p, m in zip(pieces, out["assistant_masks"]) if m)


def test_transformers_break_bug_is_fixed():
    # A Strip normalizer leaves the leading space without a token. The first span starts there,
    # so transformers' `break` drops every span, including the one over "Paris".
    tmpl = "{% for m in messages %}{% generation %} {% endgeneration %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    hf, tok = _demo_hf(tmpl, {"type": "Strip", "strip_left": True, "strip_right": True})
    chat = [{"role": "assistant", "content": "Paris"}]
    assert tok._core.render_with_spans(chat) == (" Paris", [(0, 1), (1, 6)])
    theirs = hf.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
    assert not any(theirs["assistant_masks"])  # the bug
    ours = tok.apply_chat_template(chat, return_assistant_tokens_mask=True)
    assert ours["input_ids"] == theirs["input_ids"]
    assert _trained_text(tok, ours) == "Paris"


def test_transformers_end_token_zero_bug_is_fixed():
    # An empty span right after the first character: its end maps to token 0, which transformers
    # reads as "no end" and marks through to the end of the sequence.
    tmpl = "{% for m in messages %}|{% generation %}{% endgeneration %}{{ m.content }}{% endfor %}"
    hf, tok = _demo_hf(tmpl)
    chat = [{"role": "user", "content": "Paris"}]
    theirs = hf.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
    assert all(theirs["assistant_masks"][1:])  # the bug: everything after "|" is marked
    ours = tok.apply_chat_template(chat, return_assistant_tokens_mask=True)
    assert ours["input_ids"] == theirs["input_ids"] and not any(ours["assistant_masks"])


def test_generation_mode_labels_follow_spans():
    tmpl = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m.content }}<|im_end|>{% endif %}\n{% endfor %}"
    )
    tok = chatmask.ChatTokenizer.from_parts(chatmask.demo.demo_tokenizer_json(), tmpl, {"eos_token": "<|im_end|>"})
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    out = tok.tokenize_for_trainer(chat, mode="generation")
    pieces = tok._core.decode(out["tokens"], per_token=True)
    assert "".join(p for p, m in zip(pieces, out["masks"]) if m != -100) == "Hello!<|im_end|>"
    assert all(m in (-100, t) for t, m in zip(out["tokens"], out["masks"]))
    batch = tok.tokenize_batch([chat, chat], mode="generation")
    assert batch.to_list() == [out, out]
