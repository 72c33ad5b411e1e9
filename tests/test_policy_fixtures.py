"""MaskPolicy on the real fixture tokenizers and conversations (../shared).

CI checks the first rows of every conversation file on every fixture tokenizer; `-m slow`
checks the whole corpus. Counts are printed (run with -s).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _parity import TOKENIZERS_DIR, conversation_files, template_kwargs
from _span_checks import SpanTally, check_corpus
from conftest import fixture_names, require_shared

from chatmask import ChatTokenizer, MaskPolicy, TemplateError

CI_ROWS = 15


def _invariants(name: str, limit: int | None) -> SpanTally:
    require_shared("fixtures", "tokenizers", name)
    tally = check_corpus(name, limit)
    print(
        f"\n{name}: {tally.rows} rows by method {dict(tally.methods)}, {tally.template_raised} raised in the template, "
        f"{tally.tokens} tokens, {tally.field_chars_checked} assistant field chars covered, "
        f"trained template text {dict(tally.template_text)}, {tally.straddling} straddling, "
        f"{tally.positions_from_offsets} rows on the tokenizer's offsets (text a normalizer changes)"
    )
    assert tally.problems == []
    assert tally.rows > 0 and tally.field_chars_checked > 0
    return tally


@pytest.mark.parametrize("name", fixture_names())
def test_span_invariants(name):
    _invariants(name, CI_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name", fixture_names())
def test_span_invariants_whole_corpus(name):
    _invariants(name, None)


def _rows(limit: int | None):
    for path in conversation_files():
        with open(path, encoding="utf-8", newline="") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for i, row in enumerate(rows[:limit]):
            yield f"{path.name}:{i}", row


def _generation_differences(name: str, limit: int | None):
    """Span masks (assistant, end token per turn) against the template's {% generation %} masks."""
    require_shared("fixtures", "tokenizers", name)
    tok = ChatTokenizer.from_pretrained(TOKENIZERS_DIR / name)
    rows = tokens = 0
    differences = []
    for where, row in _rows(limit):
        kwargs = template_kwargs(row)
        try:
            generation = tok.apply_chat_template(row["messages"], return_assistant_tokens_mask=True, **kwargs)
        except TemplateError:
            continue
        out = tok.tokenize(row["messages"], MaskPolicy(train_on_eot="turn", train_on_eos="turn"), **kwargs)
        assert out["input_ids"].tolist() == generation["input_ids"], where
        spans = out["labels"] != -100
        mask = np.array(generation["assistant_masks"], dtype=bool)
        rows += 1
        tokens += len(mask)
        differ = np.nonzero(spans != mask)[0]
        index = out["message_index"]
        located = {m for m, _kind, start, end in tok._core.message_spans(row["messages"], **kwargs)[1] if start < end}
        for run in np.split(differ, np.nonzero(np.diff(differ) != 1)[0] + 1) if len(differ) else []:
            text = tok._core.decode(out["input_ids"][run].tolist(), False)
            before = [m for m in index[: run[0]].tolist() if m >= 0]
            after = [m for m in index[run[-1] + 1 :].tolist() if m >= 0]
            between = range(before[-1] + 1 if before else 0, after[0] if after else len(row["messages"]))
            empty_turn = any(row["messages"][m].get("role") == "assistant" and m not in located for m in between)
            side = "generation only" if mask[run[0]] else "spans only"
            differences.append((where, side, text, "assistant message with no printed text" if empty_turn else None))
    return rows, tokens, differences


def _check_generation_blocks(name: str, limit: int | None) -> None:
    """The hand-written generation blocks wrap exactly what the spans train, turn openers
    (Qwen3's <think> tags, tool-call openers, [TOOL_CALLS]) included. The one difference: an
    assistant message with no text (empty content, no tool calls) has no span, so the spans
    train nothing of it, where its block wraps the end token. (Nor of one whose text the
    template does not print: SmolLM3's template drops tool calls.)"""
    rows, tokens, differences = _generation_differences(name, limit)
    unexplained = [d for d in differences if d[3] is None or d[1] != "generation only"]
    print(
        f"\n{name}: {rows} rows, {tokens} tokens compared, {len(differences)} differences, all assistant messages with no printed text"
    )
    assert rows > 50 and unexplained == []


GENERATION_FIXTURES = ["qwen3-gen", "llama3-gen", "mistral-7b-v0.3-gen"]


@pytest.mark.parametrize("name", GENERATION_FIXTURES)
def test_generation_blocks_equal_spans(name):
    _check_generation_blocks(name, CI_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name", GENERATION_FIXTURES)
def test_generation_blocks_equal_spans_whole_corpus(name):
    _check_generation_blocks(name, None)


def test_smollm3_generation_blocks_wrap_template_text():
    """SmolLM3's official blocks wrap the whole assistant turn: its header and the newline
    after <|im_end|> are template text the spans do not train, and an assistant message with
    no printed text (empty content; tool calls, which this template drops) has nothing to
    train. Every difference is one of these."""
    rows, tokens, differences = _generation_differences("smollm3-on-qwen3", CI_ROWS)
    kinds = {}
    for where, side, text, empty_turn in differences:
        assert side == "generation only", (where, text)
        if text in ("<|im_start|>assistant\n", "\n"):
            kind = "header or newline after the end token"
        elif empty_turn:
            kind = "assistant message with no printed text"
        elif text == "\n<|im_start|>assistant\n":
            kind = "newline, then the next header"
        else:
            pytest.fail(f"unexplained difference at {where}: {text!r}")
        kinds[kind] = kinds.get(kind, 0) + 1
    print(f"\nsmollm3-on-qwen3: {rows} rows, {tokens} tokens compared, differences {kinds}")
    assert rows > 50 and kinds


def test_metaspace_straddling_tokens_are_trained_and_counted():
    """Mistral's template writes " " + content; the tokenizer's ▁Hello holds the template's
    space and the content's first word. Without the turn prefix such a token straddles the
    span edge: it is trained, and counted."""
    require_shared("fixtures", "tokenizers", "mistral-7b-v0.3")
    tok = ChatTokenizer.from_pretrained(TOKENIZERS_DIR / "mistral-7b-v0.3")
    messages = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there."}]
    out = tok.tokenize(messages, MaskPolicy(train_turn_prefix=False))
    pieces = [tok._core.decode([t], False) for t in out["input_ids"][out["labels"] != -100].tolist()]
    assert out["straddling"] == 1
    text, spans, _ = tok._core.message_spans(messages)
    ids, positions, _, _ = tok._core.positions(text)
    first = int(np.argmax(out["labels"] != -100))
    start, end = positions[first]
    content_start = spans[-1][2]
    assert start == content_start - 1 and text[start] == " " and text[start + 1 : end] == "Hello"
    assert pieces[0] == "Hello"
    # With the turn prefix (the default) the space is the message's own text: nothing straddles.
    assert tok.tokenize(messages)["straddling"] == 0


@pytest.mark.parametrize("name", ["qwen3-gen", "smollm3-on-qwen3"])
def test_generation_source_equals_generation_masks(name):
    """`MaskPolicy(source="generation")` trains what the {% generation %} blocks wrap, and
    still gives message_index from the message spans."""
    require_shared("fixtures", "tokenizers", name)
    tok = ChatTokenizer.from_pretrained(TOKENIZERS_DIR / name)
    rows = compared = 0
    for where, row in _rows(5):
        kwargs = template_kwargs(row)
        generation = tok.apply_chat_template(row["messages"], return_assistant_tokens_mask=True, **kwargs)
        out = tok.tokenize(row["messages"], MaskPolicy(source="generation"), **kwargs)
        expected = [t if m else -100 for t, m in zip(generation["input_ids"], generation["assistant_masks"])]
        assert out["labels"].tolist() == expected, where
        spans = tok.tokenize(row["messages"], **kwargs)
        assert out["message_index"].tolist() == spans["message_index"].tolist(), where
        rows += 1
        compared += len(expected)
    assert rows > 20 and compared > 10_000
