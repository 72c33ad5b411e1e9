"""Bad input, case by case, against the reference (issue #6, hardening).

For every case the rule is the drop-in rule: when the reference (atropos' code on transformers)
accepts the input, chatmask returns the same tokens and masks, element by element; when the
reference raises, chatmask raises the ``chatmask`` error of the corresponding kind (the mapping
is in ``_differential``). The differential cases run on three fixture tokenizers with different
template styles (``qwen3`` ChatML, ``llama3``, ``mistral-7b-v0.3``), in all three modes, with
finish_reason ``""`` and ``"length"``. The chatmask side is built with ``verify=0`` so the
native renderer is what is tested (a render difference would otherwise switch to Jinja2).

Sizes (chosen so the reference itself stays tractable; its all-turns mode re-renders and
re-encodes every prefix, so it is quadratic in the number of turns):

* a 5,000,000-character message (5.3 MB of UTF-8, 2.3M tokens): last-turn mode on qwen3 in the
  default run (the reference needs ~12 s per encode pair); every mode on three tokenizers under
  ``-m slow``;
* 2,000 messages: last-turn and multistep on three tokenizers (the reference renders 2-3 times);
  all-turns on 2,000 messages with 5 assistant turns, and on 200 alternating messages; 2,000
  alternating messages in all-turns mode under ``-m slow`` (~2.5 min of reference time);
* tool arguments nested 100 deep (equal), and 50,000 deep (both raise; chatmask without
  crashing). Python's recursion limit lets the reference go to ~490 levels of tool arguments.

Cases where chatmask does not yet do what the rule asks are ``xfail(strict=True)`` with the
reason; each is a finding with a minimal reproduction (see the report of issue #6).
"""

from __future__ import annotations

import collections
import collections.abc
import datetime
import decimal
import functools
import shutil
import types

import pytest
from _differential import (
    FINISH_REASONS,
    MODES,
    compare,
    compare_all_modes,
    native_core,
    reference_tokenizer,
    run_chatmask,
    run_reference,
)
from conftest import require_shared

import chatmask

TOKENIZERS = ["qwen3", "llama3", "mistral-7b-v0.3"]
GEN_TOKENIZERS = ["qwen3-gen", "llama3-gen", "mistral-7b-v0.3-gen", "smollm3-on-qwen3"]
DATE = {"date_string": "26 Jul 2024"}

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "yo"}


ref_tok = reference_tokenizer
native = native_core


def agree(name: str, chat, modes=MODES, finish_reasons=FINISH_REASONS, **kwargs):
    """Every mode x finish_reason agrees with the reference (drop-in functions, native core)."""
    return compare_all_modes(ref_tok(name), native(name), chat, modes, finish_reasons, **{**DATE, **kwargs})


def tool_call(arguments, name="get_weather", id="abcdefghi"):
    return {"type": "function", "id": id, "function": {"name": name, "arguments": arguments}}


def tool_schema(name="get_weather", description="Weather for a city", prop="city"):
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": {prop: {"type": "string"}}, "required": [prop]},
        },
    }


# ---------------------------------------------------------------------------------------------
# The wrong type for the conversation, a message or the tokenizer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chat, named",
    [
        ("hello", "not str"),
        ({"role": "user", "content": "x"}, "not dict"),
        (5, "not int"),
        (None, "not NoneType"),
        # other sized iterables are taken as sequences of messages, as the reference iterates them
        (b"ab", "message 0 is a int, not a dict"),
        ({1, 2}, "message 0 is a int, not a dict"),
    ],
    ids=["str", "dict", "int", "None", "bytes", "set"],
)
def test_conversation_of_the_wrong_type(chat, named):
    outcomes = agree("qwen3", chat)
    assert all(isinstance(o.chatmask_error, chatmask.ConversationTypeError) for o in outcomes)
    assert named in str(outcomes[0].chatmask_error)


class _Mapping(collections.abc.Mapping):
    def __init__(self, d):
        self._d = d

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


class _List(list):
    pass


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize(
    "chat",
    [
        (U, A),
        _List([U, A]),
        [collections.OrderedDict(U), collections.OrderedDict(A)],
        [collections.UserDict(U), collections.UserDict(A)],
        [_Mapping(U), _Mapping(A)],
        [types.MappingProxyType(U), types.MappingProxyType(A)],
    ],
    ids=["tuple", "list-subclass", "OrderedDict", "UserDict", "Mapping", "MappingProxyType"],
)
def test_other_sequences_and_mappings_equal_the_reference(name, chat):
    assert all(o.error is None for o in agree(name, chat))


def test_a_generator_is_refused_not_consumed():
    # Decision: the reference "accepts" a generator only in all-turns mode, and only because its
    # first render consumes it: the loop over the turns then sees nothing and trains on no token.
    # In the other modes it raises (chat[:-1] on a generator). chatmask refuses it in every mode.
    tok = ref_tok("qwen3")
    want, _ = run_reference(tok, (m for m in [U, A]), "all", **DATE)
    assert set(want["masks"]) == {-100}  # the reference's silent garbage
    _, err = run_reference(tok, (m for m in [U, A]), "last", **DATE)
    assert isinstance(err, TypeError)
    for mode in MODES:
        _, got = run_chatmask(native("qwen3"), (m for m in [U, A]), mode, **DATE)
        assert isinstance(got, chatmask.ConversationTypeError) and "not generator" in str(got)


def test_numpy_array_of_messages_equals_the_reference():
    # Was a finding (refused as "not ndarray"); fixed in the core. pandas and Arrow rows of a
    # messages column are numpy object arrays.
    import numpy as np

    for name in TOKENIZERS:
        assert all(o.error is None for o in agree(name, np.array([U, A], dtype=object)))


@pytest.mark.parametrize("bad", [3, "user", None, ["role", "user"], 1.5, ("role", "user")], ids=repr)
def test_message_of_the_wrong_type_names_the_message(bad):
    chat = [U, A, bad, A]
    outcomes = agree("qwen3", chat)
    for o in outcomes:
        assert isinstance(o.chatmask_error, chatmask.ConversationTypeError)
        # (a tuple is reported as a list: chatmask converts tuples to lists, see the tuple finding)
        named = "list" if isinstance(bad, tuple) else type(bad).__name__
        assert f"message 2 is a {named}, not a dict" in str(o.chatmask_error)


class _NotATokenizer:
    chat_template = "{{ messages }}"


class _HalfATokenizer:
    """Quacks like a fast tokenizer (a backend, a length, a template) but its backend is not one."""

    backend_tokenizer = object()
    chat_template = "{{ messages }}"

    def __len__(self):
        return 5


@pytest.mark.parametrize(
    "tokenizer",
    [
        None,
        "qwen3",
        42,
        {"backend_tokenizer": 1},
        _NotATokenizer(),
        chatmask.ChatTokenizer,
        types.SimpleNamespace(backend_tokenizer=object()),
        _HalfATokenizer(),
    ],
    ids=[
        "None",
        "str-name",
        "int",
        "dict",
        "object-with-chat_template",
        "ChatTokenizer-class",
        "namespace-with-backend",
        "backend-without-to_str",
    ],
)
def test_arbitrary_object_as_tokenizer_is_a_type_error(tokenizer):
    for call in (chatmask.tokenize_for_trainer, chatmask.tokenize_for_trainer_multistep):
        with pytest.raises(TypeError, match=f"fast tokenizer.*not {type(tokenizer).__name__}"):
            call(tokenizer, [U, A])


def test_raw_tokenizers_object_is_a_type_error():
    from tokenizers import Tokenizer

    raw = Tokenizer.from_str(chatmask.demo.demo_tokenizer_json())
    with pytest.raises(TypeError, match="not Tokenizer"):
        chatmask.tokenize_for_trainer(raw, [U, A])


def _slow_tokenizer():
    """A pure-Python (slow) transformers tokenizer: one token per character."""
    from transformers import PythonBackend

    class CharTokenizer(PythonBackend):
        def __init__(self, **kwargs):
            self._vocab = {chr(i): i for i in range(32, 127)}
            self._vocab.update({"<unk>": 200, "</s>": 201})
            super().__init__(unk_token="<unk>", eos_token="</s>", **kwargs)

        @property
        def vocab_size(self):
            return len(self._vocab)

        def get_vocab(self):
            return dict(self._vocab)

        def _tokenize(self, text):
            return list(text)

        def _convert_token_to_id(self, token):
            return self._vocab.get(token, 200)

        def _convert_id_to_token(self, index):
            return {v: k for k, v in self._vocab.items()}.get(index, "<unk>")

    tok = CharTokenizer()
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    return tok


def test_slow_tokenizer_is_a_clear_type_error():
    require_shared("reference", "oracle.py")
    slow = _slow_tokenizer()
    assert slow.is_fast is False
    want, err = run_reference(slow, [U, A], "last")
    assert err is None and want["tokens"]  # the reference runs on it; chatmask needs the Rust backend
    for call in (chatmask.tokenize_for_trainer, chatmask.tokenize_for_trainer_multistep):
        with pytest.raises(TypeError, match="fast tokenizer.*CharTokenizer"):
            call(slow, [U, A])
    with pytest.raises(TypeError, match=r"\*fast\* tokenizer.*CharTokenizer"):
        chatmask.ChatTokenizer.from_transformers(slow)


# ---------------------------------------------------------------------------------------------
# Roles, content and keys of the wrong type
# ---------------------------------------------------------------------------------------------

MISSING = object()


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("where", [0, 1, 3], ids=["first", "assistant", "last"])
@pytest.mark.parametrize(
    "role",
    [MISSING, None, 3, ["user"], {"r": 1}, "", "USER", "user ", "agent", "tool"],
    ids=["missing", "None", "int", "list", "dict", "empty", "USER", "trailing-space", "agent", "tool"],
)
def test_role_missing_or_not_a_string(name, where, role):
    chat = [dict(U), dict(A), dict(U), dict(A)]
    if role is MISSING:
        del chat[where]["role"]
    else:
        chat[where]["role"] = role
    agree(name, chat)


CONTENTS = {
    "None": None,
    "missing": MISSING,
    "parts": [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}],
    "image-part": [{"type": "image", "url": "http://x/y.png"}],
    "dict": {"text": "hi", "n": 1},
    "int": 5,
    "float": 1.5,
    "bool": True,
    "empty": "",
    "nested-list": [["a", ["b"]], []],
    "set": {1},
    "bytes": b"hi",
    "date": datetime.date(2024, 1, 2),
    "decimal": decimal.Decimal("1.50"),
    "big-int": 2**100,
    "nan": float("nan"),
    "inf": float("-inf"),
    "object": type("Obj", (), {"__str__": lambda self: "OBJ"})(),
}


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("where", [0, 1, 3], ids=["first-user", "assistant", "last-assistant"])
@pytest.mark.parametrize("content", list(CONTENTS.values()), ids=list(CONTENTS))
def test_content_not_a_string(name, where, content):
    chat = [dict(U), dict(A), dict(U), dict(A)]
    if content is MISSING:
        del chat[where]["content"]
    else:
        chat[where]["content"] = content
    agree(name, chat)


def test_tuple_value_prints_as_python_prints_it():
    # Was a finding (a tuple became a list, printed ['a', 'b']); tuples stay tuples now.
    agree("llama3", [{"role": "user", "content": ("a", "b")}, A])


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize(
    "key",
    [1, None, 1.5, True, ("a", 1), b"k", frozenset([1])],
    ids=["int", "None", "float", "bool", "tuple", "bytes", "frozenset"],
)
def test_non_string_keys(name, key):
    agree(name, [{"role": "user", "content": "q", key: "x"}, {**A, key: {key: "y"}}])
    agree(name, [U, {"role": "assistant", "content": "", "tool_calls": [tool_call({key: "v", "city": "Paris"})]}])


# ---------------------------------------------------------------------------------------------
# Lone surrogates, control characters, NEL and the line/paragraph separators
# ---------------------------------------------------------------------------------------------


def _with(field: str, s: str):
    """A chat (and template kwargs) with `s` in one field that the fixture templates all render."""
    if field == "user":
        return [{"role": "user", "content": f"a{s}b"}, A], {}
    if field == "assistant":
        return [U, {"role": "assistant", "content": f"{s}answer{s}"}], {}
    if field == "system":
        return [{"role": "system", "content": s + "be brief"}, U, A], {}
    if field == "tool-arguments":
        return [U, {"role": "assistant", "content": "", "tool_calls": [tool_call({"city": s, s + "k": [s]})]}], {}
    if field == "tools":
        return [U, A], {"tools": [tool_schema(description=f"x{s}y", prop="c" + s)]}
    if field == "date_string":
        return [U, A], {"date_string": f"26 Jul{s}2024"}
    raise AssertionError(field)


FIELDS = ["user", "assistant", "system", "tool-arguments", "tools", "date_string"]


# date_string is printed by llama3 only; for the others it is a kwarg the template never reads.
RENDERED = [(n, f) for n in TOKENIZERS for f in FIELDS if f != "date_string" or n == "llama3"]


@pytest.mark.parametrize("name, field", RENDERED, ids=[f"{n}-{f}" for n, f in RENDERED])
@pytest.mark.parametrize("s", ["\ud800", "\udfff", "x\udc80y"], ids=["high", "low", "inside"])
def test_lone_surrogate_in_a_rendered_field_raises_a_type_error(name, field, s):
    chat, kwargs = _with(field, s)
    outcomes = agree(name, chat, **kwargs)
    for o in outcomes:
        if o.error is not None and isinstance(o.chatmask_error, chatmask.ConversationTypeError):
            assert "surrogate" in str(o.chatmask_error)


@pytest.mark.xfail(
    strict=True,
    reason="finding: chatmask refuses a lone surrogate anywhere in the input; the reference only fails when one reaches the tokenizer",
)
@pytest.mark.parametrize(
    "chat, kwargs",
    [
        ([{"role": "user", "content": "q", "meta": "\ud800"}, A], {}),  # a key no template reads
        ([{"role": "us\udc00er", "content": "q"}, A], {}),  # qwen3 skips roles it does not know
        ([U, A], {"unused": "\ud800"}),  # a template kwarg the template never reads
        ([U, A], {"date_string": "26 Jul\ud8002024"}),  # qwen3 prints no date
    ],
    ids=["unread-key", "unknown-role", "unused-kwarg", "unread-date_string"],
)
def test_lone_surrogate_the_template_never_renders(chat, kwargs):
    agree("qwen3", chat, **kwargs)


CONTROL = [
    "\x00",
    "\x01",
    "\x07",
    "\x08",
    "\x1b",
    "\x7f",
    "\x0b",
    "\x0c",
    "\r",
    "\r\n",
    "\x1c",
    "\x1f",
    "\x80",
    "\x85",
    "\x9f",
    "\u2028",
    "\u2029",
    "\u200b",
    "\ufeff",
    "\u202e",
]


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("s", CONTROL, ids=[f"U+{ord(c[0]):04X}" + ("x2" if len(c) > 1 else "") for c in CONTROL])
def test_control_characters_nel_and_separators(name, field, s):
    chat, kwargs = _with(field, s)
    outcomes = agree(name, chat, **kwargs)
    assert any(o.error is None for o in outcomes) or name.startswith("mistral")


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("s", ["\x00", "\x85", "\u2028", "\x1c"], ids=["NUL", "NEL", "LSEP", "FS"])
def test_control_characters_at_every_boundary(name, s):
    chat = [
        {"role": "system", "content": s},
        {"role": "user", "content": s + s},
        {"role": "assistant", "content": s + "x" + s, "reasoning_content": s},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": s},
    ]
    agree(name, chat)


# ---------------------------------------------------------------------------------------------
# Private-use characters and noncharacters (chatmask marks generation spans with U+FDD0..U+FDEF)
# ---------------------------------------------------------------------------------------------

PRIVATE = "\ue000\uf8ff\ufdd0\ufdd1\ufdef\U0010fffd\U0010ffff\ufffe\uffff\U000f0000"
EVERY_MARKER = "".join(chr(c) for c in range(0xFDD0, 0xFDF0))


def _everywhere(s: str):
    """`s` in every field: system, user, assistant, reasoning, tool call, tool result, extra keys, tools."""
    chat = [
        {"role": "system", "content": s + "sys" + s},
        {"role": "user", "content": s + "q" + s, s: s},
        {"role": "assistant", "content": s + "a" + s, "reasoning_content": s + "r" + s},
        {"role": "user", "content": "call" + s},
        {"role": "assistant", "content": "", "tool_calls": [tool_call({s: s, "k": [s, {s: s}]}, name="f" + s)]},
        {"role": "tool", "content": s, "tool_call_id": "abcdefghi", "name": "f" + s},
        {"role": "assistant", "content": "x" + s},
    ]
    return chat, {"tools": [tool_schema(name="t" + s, description=s, prop=s)]}


def _alternating(s: str):
    return [
        {"role": "system", "content": s + "sys" + s},
        {"role": "user", "content": s + "q" + s},
        {"role": "assistant", "content": s + "a" + s, "reasoning_content": s},
        {"role": "user", "content": s},
        {"role": "assistant", "content": "x" + s},
    ]


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize(
    "s", [PRIVATE, EVERY_MARKER, *PRIVATE], ids=["all-private", "every-marker", *[f"U+{ord(c):04X}" for c in PRIVATE]]
)
def test_private_use_and_noncharacters_in_any_field(name, s):
    chat, kwargs = _everywhere(s)
    agree(name, chat, **kwargs)
    agree(name, chat)
    outcomes = agree(name, _alternating(s))
    assert all(o.error is None for o in outcomes)


def _transformers_generation(tok, chat, **kwargs):
    from test_generation import transformers_spans

    return transformers_spans(tok, chat, **kwargs)


def _check_generation(name: str, chat, kwargs) -> None:
    """Our spans, ids and mask equal transformers' (the mask without its two known bugs)."""
    from test_generation import overlap_mask

    tok, core = ref_tok(name), native(name)
    kwargs = {**DATE, **kwargs}
    try:
        text, spans = _transformers_generation(tok, chat, **kwargs)
    except Exception:  # noqa: BLE001 - the template raised: so must we
        with pytest.raises(chatmask.ChatMaskError):
            core._core.render_with_spans(chat, **kwargs)
        return
    assert core._core.render_with_spans(chat, **kwargs) == (text, spans)
    ours = core.apply_chat_template(chat, return_assistant_tokens_mask=True, **kwargs)
    enc = tok(text, add_special_tokens=False)
    assert ours["input_ids"] == enc.input_ids
    assert ours["assistant_masks"] == overlap_mask(enc.encodings[0].offsets, spans)
    assert any(ours["assistant_masks"])
    out = core.tokenize_for_trainer(chat, mode="generation", **kwargs)
    assert out["tokens"] == enc.input_ids
    assert out["masks"] == [t if m else -100 for t, m in zip(enc.input_ids, ours["assistant_masks"])]


@pytest.mark.parametrize("name", GEN_TOKENIZERS)
@pytest.mark.parametrize(
    "s", [PRIVATE, *PRIVATE, "\x00\x85\u2028"], ids=["all-private", *[f"U+{ord(c):04X}" for c in PRIVATE], "controls"]
)
def test_private_use_and_noncharacters_do_not_corrupt_generation_spans(name, s):
    chat, kwargs = _everywhere(s)
    _check_generation(name, chat, kwargs)
    _check_generation(name, _alternating(s), {})


@pytest.mark.xfail(
    strict=True,
    reason="finding: with all 32 noncharacters U+FDD0..U+FDEF in the input there is no free span marker; transformers renders the spans",
)
def test_every_marker_character_in_the_input_generation_spans():
    _check_generation("qwen3-gen", _alternating(EVERY_MARKER), {})


def test_template_writing_a_marker_character_keeps_spans_exact():
    # Was a finding (the escapes were taken for span markers: ("sysParis", [(0, 3), (3, 8)]), so
    # "sys" was trained); fixed in the core.
    from test_generation import _demo_hf, transformers_spans

    # '\ufdd0' and '\ufdd1' are escapes in the template source, so the source has no marker in it.
    template = "{{ '\\ufdd0' }}sys{{ '\\ufdd1' }}{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    hf, _ = _demo_hf(template)
    core = chatmask.ChatTokenizer.from_transformers(hf, verify=0)  # native, not the Jinja2 fallback
    chat = [{"role": "assistant", "content": "Paris"}]
    want = transformers_spans(hf, chat)
    assert want == ("\ufdd0sys\ufdd1Paris", [(5, 10)])
    assert core._core.render_with_spans(chat) == want
    theirs = hf.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
    ours = core.apply_chat_template(chat, return_assistant_tokens_mask=True)
    assert ours == {"input_ids": theirs["input_ids"], "assistant_masks": theirs["assistant_masks"]}
    lone = "{{ '\\ufdd0' }}{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    hf, _ = _demo_hf(lone)
    core = chatmask.ChatTokenizer.from_transformers(hf, verify=0)
    assert core._core.render_with_spans(chat) == transformers_spans(hf, chat) == ("\ufdd0Paris", [(1, 6)])


# U+0897 is new in Unicode 16: repr() escapes it where the running Python does not know it.
def test_repr_of_code_points_newer_than_pythons_unicode():
    agree("llama3", [{"role": "user", "content": ["\u0897"]}, A])


# ---------------------------------------------------------------------------------------------
# Huge inputs
# ---------------------------------------------------------------------------------------------

PARAGRAPH = "The quick brown fox jumps over the lazy dog. 0123456789 ünïcødé 日本語 🙂\n"


def _five_mb_chat():
    big = (PARAGRAPH * (5_000_000 // len(PARAGRAPH) + 1))[:5_000_000]
    assert len(big.encode()) > 5_000_000
    return [{"role": "user", "content": "Repeat this back."}, {"role": "assistant", "content": big}]


def test_5mb_message():
    outcome = compare(ref_tok("qwen3"), native("qwen3"), _five_mb_chat(), "last", "", **DATE)
    assert outcome.error is None and len(outcome.output["tokens"]) > 2_000_000


@pytest.mark.slow
@pytest.mark.parametrize("name", TOKENIZERS)
def test_5mb_message_every_mode(name):
    outcomes = agree(name, _five_mb_chat(), finish_reasons=("",))
    assert all(o.error is None for o in outcomes)


def _alternating_chat(n: int):
    chat = []
    for i in range(n // 2):
        chat += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    return chat


@pytest.mark.parametrize("name", TOKENIZERS)
def test_2000_messages(name):
    outcomes = agree(name, _alternating_chat(2000), modes=("last", "multistep"))
    assert all(o.error is None for o in outcomes)


@pytest.mark.parametrize("name", ["qwen3", "llama3"])
def test_2000_messages_all_turns_with_few_assistant_turns(name):
    chat = [{"role": "user", "content": f"note {i}"} for i in range(1995)]
    for j in range(5):
        chat.insert(400 * j + 1, {"role": "assistant", "content": f"ack {j}"})
    assert len(chat) == 2000
    outcomes = agree(name, chat, modes=("all",))
    assert all(o.error is None for o in outcomes)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_200_alternating_messages_all_turns(name):
    outcomes = agree(name, _alternating_chat(200), modes=("all",))
    assert all(o.error is None for o in outcomes)


@pytest.mark.slow
def test_2000_alternating_messages_all_turns():
    outcomes = agree("qwen3", _alternating_chat(2000), modes=("all",), finish_reasons=("length",))
    assert all(o.error is None for o in outcomes)


def _nested(depth: int, leaf="v"):
    x = leaf
    for i in range(depth):
        x = {"k": x, "i": i} if i % 3 else [x, i]
    return x


@pytest.mark.parametrize("name", TOKENIZERS)
def test_deeply_nested_tool_arguments(name):
    deep = _nested(100)
    chat = [U, {"role": "assistant", "content": "", "tool_calls": [tool_call({"x": deep})]}]
    assert all(o.error is None for o in agree(name, chat))
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": deep}}]
    agree(name, [U, A], tools=tools)
    agree(name, [{"role": "user", "content": deep}, A])


@pytest.mark.xfail(
    strict=True, reason="finding: chatmask refuses input nested deeper than 256 levels; the reference renders ~490"
)
def test_nesting_the_reference_still_renders():
    agree("qwen3", [U, {"role": "assistant", "content": "", "tool_calls": [tool_call(_nested(300))]}])


def test_nesting_beyond_pythons_limit_raises_cleanly():
    deep = _nested(50_000)
    chat = [U, {"role": "assistant", "content": "", "tool_calls": [tool_call(deep)]}]
    for o in agree("qwen3", chat, finish_reasons=("",)):
        assert isinstance(o.error, RecursionError)
        assert isinstance(o.chatmask_error, chatmask.ConversationTypeError) and "nested deeper" in str(o.chatmask_error)
    batch = native("qwen3").tokenize_batch([chat, [U, A]], mode="all", on_error="skip", **DATE)
    assert batch.rows.tolist() == [1] and batch.errors[0][0] == 0 and "nested deeper" in batch.errors[0][1]


# ---------------------------------------------------------------------------------------------
# tokenizer.json that is invalid or truncated: a clear error at load time
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _qwen3_json() -> str:
    return require_shared("fixtures", "tokenizers", "qwen3", "tokenizer.json").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "cut",
    [
        lambda s: s[: len(s) // 2],
        lambda s: s[:10],
        lambda s: s[:-1],
        lambda s: "",
        lambda s: "{}",
        lambda s: "[]",
        lambda s: "null",
        lambda s: "not json \x00",
        lambda s: (
            s.replace('"type": "BPE"', '"type": "Nope"', 1)
            if '"type": "BPE"' in s
            else s.replace('"type":"BPE"', '"type":"Nope"', 1)
        ),
    ],
    ids=["half", "10-chars", "last-char-cut", "empty", "empty-object", "array", "null", "garbage", "unknown-model"],
)
def test_from_parts_rejects_a_broken_tokenizer_json(cut):
    with pytest.raises(chatmask.TokenizerError, match="cannot load tokenizer.json"):
        chatmask.ChatTokenizer.from_parts(cut(_qwen3_json()))


@pytest.mark.parametrize("arg", [123, None, b"{}"], ids=["int", "None", "bytes"])
def test_from_parts_wrong_argument_type(arg):
    with pytest.raises(TypeError):
        chatmask.ChatTokenizer.from_parts(arg)


@pytest.fixture
def qwen3_dir(tmp_path):
    src = require_shared("fixtures", "tokenizers", "qwen3")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path


@pytest.mark.parametrize(
    "file, content, says",
    [
        ("tokenizer.json", lambda s: s[: len(s) // 3], "cannot load tokenizer.json: EOF"),
        ("tokenizer.json", lambda s: s[:-2], "cannot load tokenizer.json: EOF"),
        ("tokenizer.json", lambda s: "", "cannot load tokenizer.json"),
        ("tokenizer.json", lambda s: b"\xff\xfe{}", "tokenizer.json: stream did not contain valid UTF-8"),
        ("tokenizer_config.json", lambda s: s[: len(s) // 2], "tokenizer_config.json: invalid JSON"),
        ("special_tokens_map.json", lambda s: s[:5], "special_tokens_map.json: invalid JSON"),
    ],
    ids=[
        "tokenizer-third",
        "tokenizer-minus-2",
        "tokenizer-empty",
        "tokenizer-bad-utf8",
        "config-half",
        "special-tokens-5",
    ],
)
def test_from_pretrained_of_a_directory_with_a_truncated_file(qwen3_dir, file, content, says):
    path = qwen3_dir / file
    new = content(path.read_text(encoding="utf-8"))
    if isinstance(new, bytes):
        path.write_bytes(new)
    else:
        path.write_text(new, encoding="utf-8")
    with pytest.raises(chatmask.TokenizerError, match=says):
        chatmask.ChatTokenizer.from_pretrained(qwen3_dir)


def test_from_pretrained_of_a_directory_without_tokenizer_json(qwen3_dir):
    (qwen3_dir / "tokenizer.json").unlink()
    with pytest.raises(chatmask.TokenizerError, match="tokenizer.json: No such file"):
        chatmask.ChatTokenizer.from_pretrained(qwen3_dir)
    # the intact copy loads (the failures above are the file, not the copy)
    shutil.copy(require_shared("fixtures", "tokenizers", "qwen3", "tokenizer.json"), qwen3_dir / "tokenizer.json")
    assert chatmask.ChatTokenizer.from_pretrained(qwen3_dir).encode("hi")


# ---------------------------------------------------------------------------------------------
# The same inputs in a batch: on_error="skip" lists (row, reason); "raise" sets .row
# ---------------------------------------------------------------------------------------------


def _bad_rows():
    """(label, row): one of each bad kind, valid for every fixture template except where noted."""
    return [
        ("str", "hello"),
        ("int-message", [U, 3]),
        ("missing-role", [{"content": "x"}, A]),  # all-turns: the reference's KeyError; else the template
        ("int-role", [U, {"role": 5, "content": "x"}]),
        ("surrogate", [U, {"role": "assistant", "content": "\ud800"}]),
        ("empty", []),
        ("one-assistant", [A]),  # last/all: the reference renders chat[:0]
        ("no-messages-key", {"nomessages": 1}),
        ("None", None),
        ("too-deep", [U, {"role": "assistant", "content": "", "tool_calls": [tool_call(_nested(50_000))]}]),
    ]


def _good_rows():
    return [[U, A], {"messages": [U, A]}, [U, A, U, {"role": "assistant", "content": "again\x85\u2028\ue000"}]]


def _single(core, row, mode):
    chat = row.get("messages") if isinstance(row, dict) else row
    if isinstance(row, dict) and "messages" not in row:
        return None, "no messages"
    return run_chatmask(core, chat, mode, **DATE)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("mode", MODES)
def test_batch_skip_lists_each_bad_row_and_its_reason(name, mode):
    core = native(name)
    good, bad = _good_rows(), _bad_rows()
    rows = []
    for i in range(max(len(good), len(bad))):  # interleave good and bad rows
        if i < len(good):
            rows.append(("good", good[i]))
        if i < len(bad):
            rows.append(bad[i])
    batch = core.tokenize_batch([r for _, r in rows], mode=mode, on_error="skip", **DATE)
    errors = dict(batch.errors)
    assert sorted(errors) == [r for r, _ in batch.errors], "errors are in row order"
    assert sorted(set(errors) | set(batch.rows.tolist())) == list(range(len(rows))), "every row is kept or listed"
    got = dict(zip(batch.rows.tolist(), batch.to_list()))
    for i, (label, row) in enumerate(rows):
        out, err = _single(core, row, mode)
        if err == "no messages":
            assert errors[i] == "row has no 'messages'"
        elif err is not None:
            assert errors.get(i) == str(err), f"row {i} ({label})"
        else:
            assert got[i] == out, f"row {i} ({label})"
            chat = row["messages"] if isinstance(row, dict) else row
            if label == "good":  # and the good rows are the reference's
                compare(ref_tok(name), core, chat, mode, "", **DATE)
    assert {i for i, (label, _) in enumerate(rows) if label == "good"} <= set(got)


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("label, row", _bad_rows(), ids=[label for label, _ in _bad_rows()])
def test_batch_raise_names_the_row_and_keeps_the_class(name, label, row):
    core = native(name)
    for mode in MODES:
        _, single = _single(core, row, mode)
        if single is None:  # this row is fine in this mode (e.g. one assistant message in multistep)
            continue
        with pytest.raises(chatmask.ChatMaskError) as info:
            core.tokenize_batch([[U, A], [U, A], row, [U, A]], mode=mode, **DATE)
        assert info.value.row == 2, (label, mode)
        assert str(info.value).startswith("row 2: "), (label, mode)
        if isinstance(single, BaseException):
            assert type(info.value) is type(single), (label, mode)
            assert str(info.value) == f"row 2: {single}"
        else:
            assert str(info.value) == "row 2: row has no 'messages'"


def test_batch_on_the_jinja2_path_reports_rows_the_same_way():
    """A template minijinja cannot render exactly takes the Python batch loop; same errors."""
    import warnings

    tok = ref_tok("qwen3")
    # A tuple without parentheses as a for-loop's iterable: Jinja2 compiles it, minijinja does not.
    template = (
        "{% for m in messages %}{% for p in '<|im_start|>', m.role %}{{ p }}{% endfor %}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core = chatmask.ChatTokenizer.from_transformers(tok, chat_template=template, verify=0, allow_jinja2=True)
    assert core.render_backend == "jinja2"
    rows = [[U, A], "hello", [U, 3], [], [U, {"role": "assistant", "content": "\ud800"}], [U, A]]
    batch = core.tokenize_batch(rows, mode="all", on_error="skip")
    assert batch.rows.tolist() == [0, 5]
    assert [r for r, _ in batch.errors] == [1, 2, 3, 4]
    assert "not str" in batch.errors[0][1] and "message 1 is a int" in batch.errors[1][1]
    assert "empty conversation" in batch.errors[2][1] and "surrogate" in batch.errors[3][1]
    with pytest.raises(chatmask.ConversationTypeError, match="^row 1: ") as info:
        core.tokenize_batch(rows, mode="all")
    assert info.value.row == 1
    hf = ref_tok("qwen3")
    saved = hf.chat_template
    try:  # and the good rows equal the reference on the same template
        hf.chat_template = template
        want, err = run_reference(hf, [U, A], "all")
        assert err is None and batch.to_list()[0] == want
    finally:
        hf.chat_template = saved


def test_drop_in_with_the_transformers_tokenizer_itself():
    """The same rules through the cached drop-in core (verify on), not only a native core."""
    tok = ref_tok("llama3")
    for chat in ([U, A], [{"role": "user", "content": None}, A], "hello", [U, 3], [{"content": "x"}, A], []):
        for mode in MODES:
            compare(tok, tok, chat, mode, "", **DATE)
    assert chatmask.dropin.core_for(tok).render_backend == "minijinja"
