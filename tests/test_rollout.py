"""RL rollouts (`tokenize_rollout`, `tokenize_rollout_batch`, `tokenize_group`): sampled ids placed
exactly, non-canonical ids kept, wrong ids refused, stop tokens and finish_reason="length",
multi-turn history rewriting with and without a bridge, and a hypothesis test.

The fixture part runs on every fixture tokenizer: the first CI_ROWS rows of each conversation
file unmarked, the whole corpus under `-m slow`. The sampled ids are computed independently of
chatmask.rollout (tests/_rollouts.py). Counts are printed (run with -s).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _parity import TOKENIZERS_DIR
from _rollouts import Splitter, boundary, fixture_rows, regions, rollout_kwargs
from conftest import IN_CI, fixture_names, require_shared

from chatmask import ChatMaskError, ChatTokenizer, ConversationTypeError, MaskPolicy, RolloutError
from chatmask.demo import demo_tokenizer, demo_tokenizer_json
from chatmask.rollout import ROLLOUT_POLICY, RolloutBatch

CI_ROWS = 3


def _assistants(messages):
    return [k for k, m in enumerate(messages) if m.get("role") == "assistant"]


def _completions(messages, sampled):
    return [sampled.get(k) for k in _assistants(messages)]


def _expected_labels(full, regs, sampled):
    labels = full["labels"].copy()
    for k in sampled:
        r = regs[k]
        labels[r.start : r.end] = full["input_ids"][r.start : r.end]
    return labels


class Counts(dict):
    def add(self, key, n=1):
        self[key] = self.get(key, 0) + n


def check_row(tok, splitter, messages, kwargs, counts):
    """Every rollout property on one conversation, against `tokenize` of it (the same policy)."""
    try:
        regs = {k: r for k, r in regions(tok, messages, **kwargs).items() if k > 0}
    except ChatMaskError as e:  # the template refuses the row (Llama 3: one tool call at a time)
        with pytest.raises(type(e)):
            tok.tokenize_rollout(messages, [None] * len(_assistants(messages)), **kwargs)
        counts.add("rows the template refuses, alike")
        return
    if not regs:
        counts.add("rows without a sampled message")
        return
    full = tok.tokenize(messages, ROLLOUT_POLICY, **kwargs)
    assert full is not None
    ids, labels = full["input_ids"], full["labels"]
    sampled = {k: r.ids for k, r in regs.items()}
    last = max(regs)

    # The template's own ids: the output is the tokenization itself, the sampled ids trained.
    out = tok.tokenize_rollout(messages, _completions(messages, sampled), **kwargs)
    assert np.array_equal(out["input_ids"], ids)
    assert np.array_equal(out["labels"], _expected_labels(full, regs, sampled))
    assert [t.message for t in out["turns"]] == sorted(regs)
    for t in out["turns"]:
        assert t.placed and t.retokenized_same and t.stop == "absent"
        assert (t.start, t.end) == (regs[t.message].start, regs[t.message].end)
    counts.add("rows")
    counts.add("tokens compared", 2 * len(ids))
    # extends_previous, against prompts encoded afresh here.
    previous = None
    for t in out["turns"]:
        prompt = tok.apply_chat_template(messages[: t.message], add_generation_prompt=True, **kwargs)
        expected = None if previous is None else prompt[: len(previous)] == previous
        assert t.extends_previous == expected, t
        previous = prompt + sampled[t.message]
        counts.add("extends_previous compared", expected is not None)

    # Non-canonical ids survive exactly, trained, with retokenized_same false.
    split, n_split = splitter.non_canonical(regs[last].ids)
    if n_split:
        out = tok.tokenize_rollout(messages, _completions(messages, {**sampled, last: split}), **kwargs)
        turn = out["turns"][-1]
        assert out["input_ids"][turn.start : turn.end].tolist() == split
        assert out["labels"][turn.start : turn.end].tolist() == split
        assert not turn.retokenized_same and turn.placed
        assert len(out["input_ids"]) == len(ids) + n_split
        assert tok._core.decode(out["input_ids"].tolist()) == tok._core.decode(ids.tolist())
        counts.add("non-canonical rows")

    # A stop token the template prints after the message is not doubled.
    after = int(ids[regs[last].end]) if regs[last].end < len(ids) else None
    if after is not None and splitter.is_added(after):
        with_stop = regs[last].ids + [after]
        out = tok.tokenize_rollout(messages, _completions(messages, {**sampled, last: with_stop}), **kwargs)
        assert out["turns"][-1].stop == "consumed"
        assert np.array_equal(out["input_ids"], ids)
        assert out["labels"][regs[last].end] == after
        counts.add("stop consumed")

    # finish_reason="length": nothing follows the last sampled ids.
    out = tok.tokenize_rollout(messages, _completions(messages, sampled), finish_reason="length", **kwargs)
    assert out["turns"][-1].stop == "length"
    assert np.array_equal(out["input_ids"], ids[: regs[last].end])

    # Ids that decode to other text raise, naming the message.
    wrong = tok.encode(" zqxj vvk")
    with pytest.raises(RolloutError, match=f"message {last}:"):
        tok.tokenize_rollout(messages, _completions(messages, {**sampled, last: wrong}), **kwargs)
    counts.add("wrong ids refused")
    del labels


def _run_fixtures(name, limit):
    require_shared("fixtures", "tokenizers", name)
    path = TOKENIZERS_DIR / name
    tok = ChatTokenizer.from_pretrained(path)
    splitter = Splitter((path / "tokenizer.json").read_text(encoding="utf-8"))
    counts = Counts()
    for row_id, row in fixture_rows(limit):
        try:
            check_row(tok, splitter, row["messages"], rollout_kwargs(row), counts)
        except AssertionError as e:
            raise AssertionError(f"{name} {row_id}: {e}") from e
    print(f"\n{name}: {dict(counts)}")
    assert counts.get("rows", 0) > 0 and counts.get("non-canonical rows", 0) > 0


@pytest.mark.parametrize("name", fixture_names())
def test_rollouts_on_fixture_rows(name):
    _run_fixtures(name, CI_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name", fixture_names())
def test_rollouts_on_fixture_rows_whole_corpus(name):
    _run_fixtures(name, None)


# --- multi-turn: Qwen3 drops an earlier turn's reasoning -------------------------------------

REASONING_CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "reasoning_content": "Add them.", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "reasoning_content": "Add again.", "content": "6."},
]


def _sampled_where_last(tok, messages, k):
    """Message k's ids as the model sampled them: the render of messages[:k+1] after the
    generation prompt, up to the end of its text (Qwen3's <think> block included)."""
    prompt = tok.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=False)
    text, spans, _ = tok._core.message_spans(messages[: k + 1])
    assert text.startswith(prompt)
    ids, positions, _, _ = tok._core.positions(text)
    start = boundary(positions, len(prompt))
    end = boundary(positions, max(e for m, _, _, e in spans if m == k))
    assert start is not None and end is not None
    return list(ids[start:end]), list(ids[:start])


@pytest.mark.parametrize("name", ["qwen3", "qwen3-gen"])
def test_qwen3_history_rewrite_without_and_with_a_bridge(name):
    require_shared("fixtures", "tokenizers", name)
    tok = ChatTokenizer.from_pretrained(TOKENIZERS_DIR / name)
    end = tok.encode("<|im_end|>")
    first, prompt0 = _sampled_where_last(tok, REASONING_CHAT, 1)
    second, _ = _sampled_where_last(tok, REASONING_CHAT, 3)
    assert tok._core.decode(first).startswith("<think>")
    completions = [first + end, second + end]

    out = tok.tokenize_rollout(REASONING_CHAT, completions)
    t1, t3 = out["turns"]
    # The full render has turn 1 without its reasoning: not placed, untrained, and the next
    # prompt does not extend the sampled sequence.
    assert not t1.placed and t3.placed and t3.extends_previous is False
    assert t1.stop == "consumed"  # read against the render it was sampled after, not "absent"
    assert (out["labels"][out["message_index"] == 1] == -100).all()
    assert out["input_ids"][t3.start : t3.end].tolist() == second + end

    out = tok.tokenize_rollout(REASONING_CHAT, completions, bridge=True)
    t1, t3 = out["turns"]
    ids = out["input_ids"].tolist()
    # The sequence is what the model saw: prompt 0, the first sample, the template's text up
    # to the next generation prompt, the second sample.
    assert ids[: t1.end] == prompt0 + first + end
    assert t1.stop == "consumed" and t3.placed and t3.extends_previous is False and t3.bridge_differs is True
    fresh = tok.apply_chat_template(REASONING_CHAT[:3], add_generation_prompt=True, tokenize=False)
    after_first = fresh[fresh.index("4.") + len("4.") :]
    assert tok._core.decode(ids[t1.end : t3.start]) == after_first.removeprefix("<|im_end|>")
    assert ids[t3.start : t3.end] == second + end
    trained = [i for i, label in enumerate(out["labels"].tolist()) if label != -100]
    assert set(trained) >= set(range(t1.start, t1.end)) | set(range(t3.start, t3.end))


def test_without_history_rewrite_the_bridge_equals_the_fresh_render():
    tok = demo_tokenizer()
    chat = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see you"},
    ]
    sampled = [tok.encode("hello"), tok.encode("see you")]
    plain = tok.tokenize_rollout(chat, sampled)
    bridged = tok.tokenize_rollout(chat, sampled, bridge=True)
    assert np.array_equal(plain["input_ids"], bridged["input_ids"])
    assert all(t.extends_previous for t in plain["turns"][1:])
    assert bridged["turns"][1].bridge_differs is False


# --- the API edges -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> ChatTokenizer:
    return demo_tokenizer()


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]


def test_a_stop_token_the_template_does_not_print_there_is_kept_and_trained(demo):
    eos = demo.eos_token_id
    other = next(i for i in demo._core.encode("<|im_start|>") if i != eos)
    out = demo.tokenize_rollout(CHAT, [demo.encode("hello there") + [other]])
    turn = out["turns"][0]
    assert turn.stop == "kept" and out["input_ids"][turn.end - 1] == other == out["labels"][turn.end - 1]
    full = demo.tokenize(CHAT)
    assert len(out["input_ids"]) == len(full["input_ids"]) + 1


def test_bad_rows_raise_clearly_or_are_skipped(demo):
    with pytest.raises(ConversationTypeError, match="completion_ids has 2 entries"):
        demo.tokenize_rollout(CHAT, [None, [1]])
    with pytest.raises(ConversationTypeError, match=r"completion_ids\[0\]"):
        demo.tokenize_rollout(CHAT, [["x"]])
    with pytest.raises(RolloutError, match="message 0"):
        demo.tokenize_rollout([{"role": "assistant", "content": "a"}], [demo.encode("a")])
    rows = [
        {"messages": CHAT, "completion_ids": [demo.encode("hello there")]},
        {"messages": CHAT, "completion_ids": [demo.encode("nope")]},
        (CHAT, "not a list", None),
    ]
    batch = demo.tokenize_rollout_batch(rows, on_error="skip")
    assert isinstance(batch, RolloutBatch) and batch.rows.tolist() == [0]
    assert [row for row, _ in batch.errors] == [1, 2]
    assert "decode to" in batch.errors[0][1]
    with pytest.raises(RolloutError, match="row 1"):
        demo.tokenize_rollout_batch(rows[:2])


def test_unsampled_messages_keep_the_policy_labels(demo):
    chat = CHAT + [{"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]
    policy = MaskPolicy(roles_to_train=())
    out = demo.tokenize_rollout(chat, [None, demo.encode("ok")], policy=policy)
    turn = out["turns"][0]
    trained = np.flatnonzero(out["labels"] != -100).tolist()
    assert trained == list(range(turn.start, turn.end))


def test_the_batch_form_equals_the_single_form(demo):
    rows = [
        (CHAT, [demo.encode("hello there")], None),
        (CHAT, [demo.encode("hello there") + [demo.eos_token_id]], "stop"),
        (CHAT, [demo.encode("hello")], "length"),
    ]
    rows[2] = ([CHAT[0], {"role": "assistant", "content": "hello"}], rows[2][1], "length")
    batch = demo.tokenize_rollout_batch(rows, num_threads=2)
    assert len(batch) == 3
    for i, (messages, completions, reason) in enumerate(rows):
        one = demo.tokenize_rollout(messages, completions, finish_reason=reason)
        assert np.array_equal(batch[i]["input_ids"], one["input_ids"])
        assert np.array_equal(batch[i]["labels"], one["labels"])
        assert batch[i]["turns"] == one["turns"]


def test_a_group_renders_the_prompt_once_and_trains_only_the_samples(demo):
    prompt = [{"role": "user", "content": "hi"}]
    samples = [demo.encode("a") + [demo.eos_token_id], demo.encode("bb")]
    group = demo.tokenize_group(prompt, samples, scores=[1.0, 0.0])
    head = demo.apply_chat_template(prompt, add_generation_prompt=True)
    for tokens, masks, sample in zip(group.tokens, group.masks, samples):
        assert tokens == head + sample
        assert masks == [-100] * len(head) + sample
    assert group.scores == [1.0, 0.0]
    with pytest.raises(ValueError, match="1 scores for 2"):
        demo.tokenize_group(prompt, samples, scores=[1.0])


# --- hypothesis: random conversations ------------------------------------------------------

if IN_CI:  # a test dependency: missing is a failure under CI=true, a skip elsewhere
    import hypothesis
else:
    hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402

_PIECES = list("ab Zé漢🙂\n\t .,:") + ["\n\n", "Hello", " world", "ing"]
_TEXT = st.lists(st.sampled_from(_PIECES), min_size=1, max_size=10).map("".join)


@st.composite
def random_chats(draw):
    chat = [{"role": "system", "content": draw(_TEXT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        chat += [{"role": "user", "content": draw(_TEXT)}, {"role": "assistant", "content": draw(_TEXT)}]
    return chat, draw(st.lists(st.booleans(), min_size=3, max_size=3)), draw(st.booleans())


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_random_rollouts_keep_every_property(kind):
    tok = demo_tokenizer(kind)
    splitter = Splitter(demo_tokenizer_json(kind))
    counts = Counts()

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @hypothesis.given(random_chats())
    def run(drawn):
        chat, which, non_canonical = drawn
        regs = regions(tok, chat)
        sampled = {k: r.ids for j, (k, r) in enumerate(sorted(regs.items())) if k > 0 and which[j]}
        if non_canonical:
            sampled = {k: splitter.non_canonical(ids)[0] for k, ids in sampled.items()}
        out = tok.tokenize_rollout(chat, _completions(chat, sampled))
        full = tok.tokenize(chat, ROLLOUT_POLICY)
        assert tok._core.decode(out["input_ids"].tolist()) == tok._core.decode(full["input_ids"].tolist())
        for turn in out["turns"]:
            assert out["input_ids"][turn.start : turn.end].tolist() == sampled[turn.message]
            assert out["labels"][turn.start : turn.end].tolist() == sampled[turn.message]
            assert turn.retokenized_same == (sampled[turn.message] == regs[turn.message].ids)
        counts.add("rollouts")
        counts.add("turns", len(out["turns"]))

    run()
    print(f"\n{kind}: {dict(counts)}")
    assert counts.get("turns", 0) > 0


def test_sampled_ids_must_be_ints(demo):
    with pytest.raises(ConversationTypeError):
        demo.tokenize_rollout(CHAT, [[-1]])
    assert json.dumps([t.message for t in demo.tokenize_rollout(CHAT, [None])["turns"]]) == "[]"
