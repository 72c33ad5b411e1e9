"""MaskPolicy on the demo tokenizer (no fixtures): what is trained, message_index, overrides,
reasoning, dataset shapes, length limits, continuations, batches, and axolotl's failure modes."""

from __future__ import annotations

import numpy as np
import pytest

import chatmask
from chatmask import ChatTokenizer, MaskPolicy, SequenceTooLongError, SpanError
from chatmask.demo import demo_conversations, demo_tokenizer

DEMO = {row["id"]: row for row in demo_conversations()}


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return demo_tokenizer()


def trained_text(tok: ChatTokenizer, out: dict) -> list[str]:
    """The decoded text of each run of trained tokens."""
    runs, current = [], []
    for token, label in zip(out["input_ids"].tolist(), out["labels"].tolist()):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok._core.decode(r, False) for r in runs]


def test_assistant_text_and_end_of_turn_are_trained(tok):
    out = tok.tokenize(DEMO["demo-1"])
    assert trained_text(tok, out) == [
        "Soft rain on the roof,\nthe gutters hum their old song,\nmorning comes slowly.<|im_end|>"
    ]
    assert out["span_method"] == "one_render"
    assert out["input_ids"].dtype == np.int64 and out["message_index"].dtype == np.int32
    index = out["message_index"]
    text_of = lambda m: tok._core.decode(out["input_ids"][index == m].tolist(), False)  # noqa: E731
    assert text_of(0) == "Write a haiku about rain.<|im_end|>"
    assert text_of(1).startswith("Soft rain") and text_of(1).endswith("<|im_end|>")
    # Headers and the newline after each end token are template text.
    assert "<|im_start|>" in text_of(-1) and set(np.unique(index)) == {-1, 0, 1}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (MaskPolicy(train_on_eot="none", train_on_eos="none"), ["Paris.", "Tokyo."]),
        (MaskPolicy(train_on_eos="last"), ["Paris.", "Tokyo.<|im_end|>"]),
        (
            MaskPolicy(train_on_eos="all"),
            ["<|im_end|>", "<|im_end|>", "Paris.<|im_end|>", "<|im_end|>", "Tokyo.<|im_end|>"],
        ),
        (MaskPolicy(roles_to_train=["user"]), ["What is the capital of France?<|im_end|>", "And of Japan?<|im_end|>"]),
    ],
)
def test_end_tokens_and_roles(tok, policy, expected):
    row = {"messages": [m for m in DEMO["demo-0"]["messages"]]}
    row["messages"][-1] = {"role": "assistant", "content": "Tokyo."}
    assert trained_text(tok, tok.tokenize(row, policy)) == expected


def test_train_on_inputs_trains_every_message(tok):
    out = tok.tokenize(DEMO["demo-1"], MaskPolicy(train_on_inputs=True))
    assert trained_text(tok, out)[0] == "Write a haiku about rain.<|im_end|>"
    assert len(trained_text(tok, out)) == 2


def test_eot_tokens_must_be_single_tokens(tok):
    with pytest.raises(ValueError, match="not one"):
        tok.tokenize(DEMO["demo-1"], MaskPolicy(eot_tokens=["<|im_end|> and more"]))
    out = tok.tokenize(DEMO["demo-1"], MaskPolicy(eot_tokens=["<|im_end|>"]))
    assert trained_text(tok, out)[-1].endswith("<|im_end|>")


def test_per_message_training_and_detail(tok):
    messages = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red.", "training": False},
        {"role": "user", "content": "Another?", "training": True},
        # Characters 0-3 ("Blue", end inclusive as in axolotl) trained, the rest not.
        {
            "role": "assistant",
            "content": "Blue, maybe.",
            "training_detail": [{"begin_offset": 0, "end_offset": 3, "train": True}],
        },
    ]
    out = tok.tokenize(messages)
    assert trained_text(tok, out) == ["Another?<|im_end|>", "Blue", "<|im_end|>"]
    renamed = [{("keep" if k == "training" else k): v for k, v in m.items()} for m in messages]
    out = tok.tokenize(renamed, MaskPolicy(message_field_training="keep"))
    assert trained_text(tok, out)[0] == "Another?<|im_end|>"


def test_bad_training_fields_name_the_message(tok):
    with pytest.raises(chatmask.ChatMaskError, match="message 1: 'training' must be true or false"):
        tok.tokenize([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "training": "yes"}])
    bad = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "training_detail": [{"begin_offset": 3}]},
    ]
    with pytest.raises(chatmask.ChatMaskError, match="end_offset"):
        tok.tokenize(bad)


def test_reasoning_trained_or_not(tok):
    row = DEMO["demo-4"]
    with_reasoning = trained_text(tok, tok.tokenize(row))
    # The reasoning of the first turn is dropped by the template (before the last user turn).
    assert with_reasoning == ["5<|im_end|>", "<think>\n2 * 3 = 6.\n</think>\n\n6<|im_end|>"]
    without = trained_text(tok, tok.tokenize(row, MaskPolicy(train_reasoning=False)))
    assert without == ["5<|im_end|>", "6<|im_end|>"]


def test_inline_thinking_is_located_by_a_checked_fallback_or_split(tok):
    row = DEMO["demo-0"]
    out = tok.tokenize(row)
    # The template splits the content on </think>, which breaks the markers: a diff finds it.
    assert out["span_method"] == "diff"
    text = tok.apply_chat_template(row["messages"], tokenize=False)
    last_turn = text.rsplit("<|im_start|>assistant\n", 1)[1]
    assert trained_text(tok, out)[-1] == last_turn.rstrip("\n")
    split = tok.tokenize(row, MaskPolicy(split_thinking=True))
    assert split["span_method"] == "one_render"
    assert np.array_equal(split["input_ids"], out["input_ids"])
    assert np.array_equal(split["labels"], out["labels"])


def test_tool_calls_trained_from_their_opener(tok):
    out = tok.tokenize(DEMO["demo-2"])
    first = trained_text(tok, out)[0]
    assert first.startswith('\n<tool_call>\n{"name": "get_weather"') and first.endswith("</tool_call><|im_end|>")
    off = tok.tokenize(DEMO["demo-2"], MaskPolicy(train_turn_prefix=False))
    assert trained_text(tok, off)[0].startswith('get_weather", "arguments"')


def test_sharegpt_rows_and_role_map(tok):
    plain = DEMO["demo-0"]["messages"]
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in plain]}
    policy = MaskPolicy(field_messages="conversations")
    a, b = tok.tokenize(sharegpt, policy), tok.tokenize(plain)
    assert np.array_equal(a["input_ids"], b["input_ids"]) and np.array_equal(a["labels"], b["labels"])
    custom = {
        "conversations": [
            {"speaker": {"user": "me", "assistant": "bot", "system": "system"}[m["role"]], "text": m["content"]}
            for m in plain
        ]
    }
    policy = MaskPolicy(
        field_messages="conversations",
        message_property_mappings={"role": "speaker", "content": "text"},
        roles={"user": ["me"], "assistant": ["bot"], "system": ["system"]},
    )
    c = tok.tokenize(custom, policy)
    assert np.array_equal(c["labels"], b["labels"])


def test_system_field_and_drop_system(tok):
    row = {"messages": DEMO["demo-1"]["messages"], "sys": "Be kind."}
    with_system = tok.tokenize(row, MaskPolicy(field_system="sys"))
    assert tok._core.decode(with_system["input_ids"].tolist(), False).startswith(
        "<|im_start|>system\nBe kind.<|im_end|>"
    )
    dropped = tok.tokenize(row, MaskPolicy(field_system="sys", drop_system_message=True))
    assert np.array_equal(dropped["input_ids"], tok.tokenize(row)["input_ids"])


def test_policy_validation():
    with pytest.raises(ValueError, match="train_on_eot"):
        MaskPolicy(train_on_eot="sometimes")
    with pytest.raises(ValueError, match="overflow"):
        MaskPolicy(overflow="wrap")
    with pytest.raises(ValueError, match="max_length"):
        MaskPolicy(max_length=0)
    with pytest.raises(TypeError):
        MaskPolicy(roles_to_train="assistant")
    with pytest.raises(ValueError, match="unknown MaskPolicy fields"):
        MaskPolicy.from_dict({"train_on_eos": "turn", "train_on_everything": True})
    policy = MaskPolicy.from_dict({"roles_to_train": ["assistant", "tool"], "max_length": 10})
    assert MaskPolicy.from_dict(policy.to_dict()) == policy


def test_policy_types_are_checked_in_python():
    # Types read off the dataclass annotations: one bool, one str, one optional str, and lists.
    with pytest.raises(TypeError, match="train_on_inputs must be True or False"):
        MaskPolicy(train_on_inputs="yes")
    with pytest.raises(TypeError, match="split_thinking must be True or False"):
        MaskPolicy(split_thinking=1)
    with pytest.raises(TypeError, match="message_field_training must be a str"):
        MaskPolicy(message_field_training=None)
    with pytest.raises(TypeError, match="field_system must be a str"):
        MaskPolicy(field_system=3)
    with pytest.raises(TypeError, match="roles_to_train must hold str"):
        MaskPolicy(roles_to_train=["assistant", 1])
    with pytest.raises(TypeError, match="eot_tokens must hold str"):
        MaskPolicy(eot_tokens=[7])
    assert MaskPolicy(train_on_inputs=np.bool_(True)).train_on_inputs is True
    assert MaskPolicy(field_system=None).field_system is None


def test_the_core_reads_every_policy_option_unchanged(tok):
    """MaskPolicy declares the options and their defaults once: the core has none of its own, so
    `policy_view` (the core's reading) must give back exactly what `to_core()` sent, for the
    defaults and for a policy where every option differs from them."""
    default = MaskPolicy().to_core()
    assert tok._core.policy_view(default) == default
    changed = MaskPolicy(
        roles_to_train=["user", "tool"],
        train_on_inputs=True,
        train_on_eot="all",
        train_on_eos="last",
        eot_tokens=["<|im_end|>"],
        train_reasoning=False,
        train_turn_prefix=False,
        message_field_training="t",
        message_field_training_detail="td",
        source="generation",
        sanitize_control_tokens=True,
        max_length=7,
        overflow="truncate_left",
    ).to_core()
    assert [k for k in default if changed[k] == default[k]] == []
    (im_end,) = tok._core.encode("<|im_end|>")
    assert tok._core.policy_view(changed) == dict(changed, eot_tokens=[im_end])
    for key in default:  # a key to_core() forgot is an internal error, not a silent default
        with pytest.raises(ValueError, match=f'internal error: the policy dict has no "{key}"'):
            tok._core.policy_view({k: v for k, v in default.items() if k != key})
    with pytest.raises(ValueError, match='unknown policy field "train_on_everything"'):
        tok._core.policy_view(dict(default, train_on_everything=True))


def test_marker_characters_in_input_are_refused(tok):
    with pytest.raises(SpanError, match="U\\+100000"):
        tok.tokenize([{"role": "user", "content": "a\U00100005b"}, {"role": "assistant", "content": "c"}])


class TestLength:
    row = DEMO["demo-0"]

    def full(self, tok):
        return tok.tokenize(self.row)

    def test_error_and_drop(self, tok):
        n = len(self.full(tok)["input_ids"])
        with pytest.raises(SequenceTooLongError, match=f"{n} tokens, max_length is {n - 1}"):
            tok.tokenize(self.row, MaskPolicy(max_length=n - 1))
        assert tok.tokenize(self.row, MaskPolicy(max_length=n - 1, overflow="drop")) is None
        assert len(tok.tokenize(self.row, MaskPolicy(max_length=n))["input_ids"]) == n

    def test_truncate_right(self, tok):
        full = self.full(tok)
        out = tok.tokenize(self.row, MaskPolicy(max_length=20, overflow="truncate_right"))
        assert (
            np.array_equal(out["input_ids"], full["input_ids"][:20]) and out["truncated"] == len(full["input_ids"]) - 20
        )

    def test_truncate_left_keeps_the_last_target_whole(self, tok):
        full = self.full(tok)
        trained = np.nonzero(full["labels"] != -100)[0]
        last_message = full["message_index"][trained[-1]]
        first = trained[full["message_index"][trained] == last_message][0]
        target = trained[-1] + 1 - first
        out = tok.tokenize(self.row, MaskPolicy(max_length=target + 3, overflow="truncate_left"))
        assert len(out["input_ids"]) == target + 3
        # The target fits with the template text after it, so context goes from the left.
        assert np.array_equal(out["input_ids"], full["input_ids"][-(target + 3) :])
        assert np.array_equal(out["labels"], full["labels"][-(target + 3) :])
        # Only when the target and its trailing text do not fit does the trailing text go too.
        tail = len(full["input_ids"]) - trained[-1] - 1
        assert tail > 0
        exact = tok.tokenize(self.row, MaskPolicy(max_length=target, overflow="truncate_left"))
        assert np.array_equal(exact["input_ids"], full["input_ids"][first : trained[-1] + 1])
        with pytest.raises(SequenceTooLongError, match="last trained span alone"):
            tok.tokenize(self.row, MaskPolicy(max_length=target - 1, overflow="truncate_left"))

    def test_batch_lists_dropped_rows(self, tok):
        rows = list(DEMO.values())
        lengths = [len(tok.tokenize(r)["input_ids"]) for r in rows]
        limit = sorted(lengths)[len(lengths) // 2]
        batch = tok.tokenize_batch(rows, policy=MaskPolicy(max_length=limit, overflow="drop"))
        assert batch.dropped == [i for i, n in enumerate(lengths) if n > limit]
        assert batch.rows.tolist() == [i for i, n in enumerate(lengths) if n <= limit]
        with pytest.raises(SequenceTooLongError) as info:
            tok.tokenize_batch(rows, policy=MaskPolicy(max_length=limit))
        assert info.value.row == next(i for i, n in enumerate(lengths) if n > limit)


def test_tokenize_continuation(tok):
    context = DEMO["demo-1"]["messages"][:1]
    cont = "Rain taps the window."
    out = tok.tokenize_continuation(context, cont)
    prompt = tok.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
    expected = tok.encode(prompt) + tok.encode(cont)
    assert out["input_ids"].tolist() == expected
    n_context = len(tok.encode(prompt))
    assert out["labels"].tolist() == [-100] * n_context + tok.encode(cont)
    assert out["message_index"][n_context:].tolist() == [1] * len(tok.encode(cont))
    cut = tok.tokenize_continuation(context, cont, max_length=len(expected) - 4)
    assert cut["input_ids"].tolist() == expected[4:] and cut["truncated"] == 4
    with pytest.raises(SequenceTooLongError, match="continuation alone"):
        tok.tokenize_continuation(context, cont, max_length=2)


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_equals_single_rows(tok, threads):
    rows = list(DEMO.values()) * 3
    policy = MaskPolicy(train_reasoning=False)
    batch = tok.tokenize_batch(rows, policy=policy, num_threads=threads)
    assert len(batch) == len(rows) and batch.errors == []
    compared = 0
    for i, row in enumerate(rows):
        single = tok.tokenize(row, policy)
        got = batch[i]
        for key in ("input_ids", "labels", "message_index"):
            assert got[key].tolist() == single[key].tolist(), (i, key)
            compared += len(single[key])
        assert batch.span_methods[i] == single["span_method"]
        assert batch.straddling[i] == single["straddling"]
    assert compared > 1000


def test_batch_shape_errors_name_the_row(tok):
    rows = [DEMO["demo-1"], {"no_messages": []}, DEMO["demo-3"]]
    with pytest.raises(chatmask.ConversationTypeError, match="row 1: .*'messages'"):
        tok.tokenize_batch(rows, policy=MaskPolicy())
    batch = tok.tokenize_batch(rows, policy=MaskPolicy(), on_error="skip")
    assert batch.rows.tolist() == [0, 2] and batch.errors[0][0] == 1 and "messages" in batch.errors[0][1]


# --- axolotl's turn finding (re-render with a dummy message, diff the tokens) ---------------


def axolotl_labels(tok: ChatTokenizer, messages, chat_template=None) -> list[int]:
    """axolotl's ChatTemplateStrategy (roles_to_train=["assistant"], train_on_eos="turn",
    eot = eos) as in ../shared/seeds/axolotl_chat_template_strategy.txt, on our tokenizer."""
    kwargs = {} if chat_template is None else {"chat_template": chat_template}
    build = lambda turns: tok.apply_chat_template(turns, **kwargs)  # noqa: E731
    input_ids = build(messages)
    labels = [-100] * len(input_ids)
    eos = tok.eos_token_id
    for i, turn in enumerate(messages):
        dummy_ids = build(messages[:i] + [{"role": turn["role"], "content": "[[dummy_message]]"}])
        full_ids = build(messages[: i + 1])
        n = min(len(dummy_ids), len(full_ids))
        start = next((k for k in range(n) if dummy_ids[k] != full_ids[k]), None)
        end = next((len(full_ids) - k for k in range(n) if dummy_ids[-1 - k] != full_ids[-1 - k]), None)
        if start is None or end is None or end <= start:
            continue  # "could not find turn": silently untrained
        if turn["role"] == "assistant":
            labels[start:end] = input_ids[start:end]
            eot = next((k for k in range(end, len(input_ids)) if input_ids[k] == eos), -1)
            if eot != -1 and abs(eot - end) <= 3:
                labels[eot] = input_ids[eot]
    return labels


def decoded_trained(tok, ids, labels) -> str:
    return tok._core.decode([t for t, label in zip(ids, labels) if label != -100], False)


@pytest.mark.parametrize(
    ("why", "content"),
    [
        ("content equal to the dummy is never found", "[[dummy_message]]"),
        ("tokens shared with the dummy's start are cut", "[[dummy_message]] is a placeholder."),
        ("tokens shared with the dummy's end are cut", "See [[dummy_message]]"),
    ],
)
def test_axolotl_dummy_collisions(tok, why, content):
    messages = [{"role": "user", "content": "Show the placeholder."}, {"role": "assistant", "content": content}]
    ours = tok.tokenize(messages)
    assert decoded_trained(tok, ours["input_ids"].tolist(), ours["labels"].tolist()) == content + "<|im_end|>"
    theirs = axolotl_labels(tok, messages)
    assert decoded_trained(tok, ours["input_ids"].tolist(), theirs) != content + "<|im_end|>", why


def test_axolotl_prefix_renders_that_are_not_prefixes(tok):
    # The template drops reasoning before the last user turn, so rendering messages[:2]
    # (with reasoning) is longer than that part of the whole chat: axolotl's indices, taken
    # from the shorter render, land on the wrong tokens of the whole one.
    messages = DEMO["demo-4"]["messages"]
    ours = tok.tokenize(messages)
    ids = ours["input_ids"].tolist()
    assert (
        decoded_trained(tok, ids, ours["labels"].tolist()) == "5<|im_end|><think>\n2 * 3 = 6.\n</think>\n\n6<|im_end|>"
    )
    theirs = axolotl_labels(tok, messages)
    assert decoded_trained(tok, ids, theirs) != decoded_trained(tok, ids, ours["labels"].tolist())
    wrong = [k for k, (a, b) in enumerate(zip(theirs, ours["labels"].tolist())) if a != b]
    assert any(ours["message_index"][k] != 1 and ours["message_index"][k] != 3 for k in wrong if theirs[k] != -100)


def test_axolotl_end_of_turn_window(tok):
    # A template that closes each assistant turn with a footer: the end-of-turn token is more
    # than 3 tokens after the content, so axolotl's window misses it; the spans find it.
    template = tok.apply_chat_template.__self__._core.template_source().replace(
        "{{- '<|im_end|>\\n' }}\n    {%- else %}",
        "{{- ' -- end of answer, thank you' + '<|im_end|>\\n' }}\n    {%- else %}",
    )
    assert template != tok._core.template_source()
    messages = DEMO["demo-1"]["messages"]
    ours = tok.tokenize(messages, chat_template=template)
    ids = ours["input_ids"].tolist()
    trained = decoded_trained(tok, ids, ours["labels"].tolist())
    assert trained.endswith("slowly. -- end of answer, thank you<|im_end|>")
    theirs = decoded_trained(tok, ids, axolotl_labels(tok, messages, chat_template=template))
    assert not theirs.endswith("<|im_end|>")


# --- found while documenting: each was wrong before ------------------------------------------


def test_empty_message_scaffolding_goes_to_nobody(tok):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    out = tok.tokenize(messages, MaskPolicy(train_on_inputs=True))
    assert trained_text(tok, out) == ["a<|im_end|>", "b<|im_end|>", "c<|im_end|>"]
    index = out["message_index"]
    assert tok._core.decode(out["input_ids"][index == 2].tolist(), False) == "b<|im_end|>"


def test_turn_openers_are_not_end_tokens(tok):
    # A system block left unclosed: the first special token after it opens the user turn.
    template = tok._core.template_source().replace(
        "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}",
        "{{- '<|im_start|>system\\n' + messages[0].content + '\\n' }}",
    )
    assert template != tok._core.template_source()
    messages = [{"role": "system", "content": "S"}] + DEMO["demo-1"]["messages"]
    out = tok.tokenize(messages, MaskPolicy(train_on_eos="all", train_on_inputs=True), chat_template=template)
    im_start = tok.encode("<|im_start|>")[0]
    trained = out["input_ids"][out["labels"] != -100].tolist()
    assert im_start not in trained and trained_text(tok, out)[0] == "S"


def test_field_system_only_when_there_is_none(tok):
    messages = [{"role": "system", "content": "Mine."}] + DEMO["demo-1"]["messages"]
    shaped, _ = MaskPolicy(field_system="sys").shape({"messages": messages, "sys": "Other."})
    assert [m["content"] for m in shaped if m["role"] == "system"] == ["Mine."]


def test_roles_to_train_and_eot_default_as_axolotl(tok):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    out = tok.tokenize(row, MaskPolicy(field_messages="conversations", roles_to_train=["gpt"]))
    assert trained_text(tok, out) == ["yo<|im_end|>"]
    assert MaskPolicy(train_on_eos="none").train_on_eot == "none"
    assert MaskPolicy(train_on_eos="all", train_on_eot="turn").train_on_eot == "turn"
