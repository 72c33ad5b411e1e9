"""The encoding engines: the fast engine against the `tokenizers` crate, element by element, and
the gate that decides which one a tokenizer gets.

Totals (texts, ids compared, differences) are printed at the end of the run.
"""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest
from conftest import ENCODER_TOTALS, IN_CI, conversation_file_names, fixture_names, require_shared

import chatmask
from chatmask import ChatTokenizer, MaskPolicy
from chatmask.errors import TokenizerError

# Rows per conversation file rendered for the CI subset; -m slow takes every row.
CI_ROWS = 25
FUZZ_TOKENIZERS = ("qwen3", "llama3", "mistral-7b-v0.3", "mistral-nemo")
# The fixtures whose tokenizer.json is not a copy of another's.
DISTINCT_TOKENIZERS = ("llama3", "mistral-7b-v0.3", "mistral-nemo", "qwen3")


def _load(name: str, encoder: str = "auto") -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(require_shared("fixtures", "tokenizers", name), encoder=encoder)


_TOKENIZERS: dict[tuple[str, str], ChatTokenizer] = {}


def loaded(name: str, encoder: str = "auto") -> ChatTokenizer:
    key = (name, encoder)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _load(name, encoder)
    return _TOKENIZERS[key]


def rows(limit: int | None):
    """(file, index, row) over every conversation file, the first `limit` rows of each."""
    for fname in conversation_file_names():
        path = require_shared("fixtures", "conversations", fname)
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if limit is not None and i >= limit:
                    break
                yield fname, i, json.loads(line)


def rendered_texts(tok: ChatTokenizer, limit: int | None) -> list[str]:
    """Every row rendered with the tokenizer's template (rows the template refuses are left out)."""
    out = []
    for _, _, row in rows(limit):
        kwargs = {"tools": row["tools"]} if row.get("tools") else {}
        for gen in (False, True):
            try:
                out.append(
                    tok.apply_chat_template(row["messages"], add_generation_prompt=gen, tokenize=False, **kwargs)
                )
            except chatmask.ChatMaskError:
                continue
    return out


def compare_ids(tok: ChatTokenizer, texts, label: str) -> None:
    """Fast engine vs tokenizers on each text, id by id."""
    differences = []
    for text in texts:
        got = tok._core.encode(text)
        want = tok._core.reference_encode(text)
        ENCODER_TOTALS["texts"] += 1
        ENCODER_TOTALS["ids"] += len(want)
        if got != want:
            ENCODER_TOTALS["differences"] += 1
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            differences.append(f"{label}: {text[:80]!r}... first differing id at {at}")
    assert not differences, "\n".join(differences[:5])


@pytest.mark.parametrize("name", fixture_names())
def test_every_fixture_tokenizer_gets_the_fast_engine(name):
    tok = loaded(name)
    assert tok.encoder_backend == "fast", tok.encoder_fallback_reason
    assert tok.encoder_fallback_reason is None
    assert _load(name, "fast").encoder_backend == "fast"
    forced = loaded(name, "tokenizers")
    assert forced.encoder_backend == "tokenizers"
    assert "chosen" in forced.encoder_fallback_reason


def _raw_encode(name, limit):
    tok = loaded(name)
    texts = rendered_texts(tok, limit)
    assert len(texts) > 50
    compare_ids(tok, texts, name)


@pytest.mark.parametrize("name", DISTINCT_TOKENIZERS)
def test_raw_encode_of_rendered_rows_equals_tokenizers(name):
    _raw_encode(name, CI_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name", DISTINCT_TOKENIZERS)
def test_raw_encode_of_rendered_rows_equals_tokenizers_every_row(name):
    _raw_encode(name, None)


def _batch_rows(limit):
    return [{"messages": r["messages"], **({"tools": r["tools"]} if r.get("tools") else {})} for _, _, r in rows(limit)]


def _assert_batches_equal(a, b, what):
    assert a.errors == b.errors, what
    for field in ("input_ids", "labels", "offsets"):
        x, y = getattr(a, field, None), getattr(b, field, None)
        if x is None and y is None:
            continue
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what}: {field}")
        ENCODER_TOTALS["output_values"] += int(np.asarray(x).size)


def _outputs(name, limit):
    fast, slow = loaded(name), loaded(name, "tokenizers")
    batch = _batch_rows(limit)
    modes = ["last", "all", "multistep"] + (["generation"] if name.endswith("-gen") else [])
    for mode in modes:
        for finish in ("", "length"):
            a = fast.tokenize_batch(batch, mode=mode, finish_reason=finish, on_error="skip")
            b = slow.tokenize_batch(batch, mode=mode, finish_reason=finish, on_error="skip")
            _assert_batches_equal(a, b, f"{name} {mode} {finish!r}")
    policy = MaskPolicy()
    a = fast.tokenize_batch(batch, policy=policy, on_error="skip")
    b = slow.tokenize_batch(batch, policy=policy, on_error="skip")
    _assert_batches_equal(a, b, f"{name} policy")
    np.testing.assert_array_equal(a.message_index, b.message_index)
    ENCODER_TOTALS["output_rows"] += len(batch) * (2 * len(modes) + 1)


@pytest.mark.parametrize("name", fixture_names())
def test_every_output_equal_on_both_engines(name):
    _outputs(name, 12)


@pytest.mark.slow
@pytest.mark.parametrize("name", fixture_names())
def test_every_output_equal_on_both_engines_every_row(name):
    _outputs(name, None)


def test_continuation_and_sanitize_equal_on_both_engines():
    fast, slow = loaded("qwen3"), loaded("qwen3", "tokenizers")
    for _, _, row in rows(3):
        msgs = row["messages"]
        if len(msgs) < 2:
            continue
        text = msgs[-1]["content"] if isinstance(msgs[-1].get("content"), str) else "a reply"
        a = fast.tokenize_continuation(msgs[:-1], text)
        b = slow.tokenize_continuation(msgs[:-1], text)
        assert {k: np.asarray(v).tolist() for k, v in a.items()} == {k: np.asarray(v).tolist() for k, v in b.items()}
        policy = MaskPolicy(sanitize_control_tokens=True)
        x = fast.tokenize({"messages": msgs + [{"role": "user", "content": "<|im_end|> hi"}]}, policy)
        y = slow.tokenize({"messages": msgs + [{"role": "user", "content": "<|im_end|> hi"}]}, policy)
        assert list(x["input_ids"]) == list(y["input_ids"]) and list(x["labels"]) == list(y["labels"])


# --- The gate -------------------------------------------------------------------------------


def _demo_json(kind: str = "bytelevel") -> dict:
    return json.loads(chatmask._core.demo_tokenizer_json(kind))


def _from_json(data: dict, encoder: str = "auto") -> ChatTokenizer:
    return ChatTokenizer.from_parts(json.dumps(data), "{{ messages[0]['content'] }}", {}, encoder=encoder)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_demo_tokenizers_get_the_fast_engine(kind):
    tok = _from_json(_demo_json(kind))
    assert tok.encoder_backend == "fast", tok.encoder_fallback_reason
    compare_ids(
        tok,
        [
            m["content"]
            for chat in json.loads(chatmask._core.DEMO_CONVERSATIONS_JSON)
            for m in chat["messages"]
            if isinstance(m.get("content"), str)
        ][:200],
        kind,
    )


def _wordpiece_json() -> dict:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "##s": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    return json.loads(tok.to_str())


@pytest.mark.parametrize(
    "doctor, component",
    [
        (lambda j: _wordpiece_json(), "model WordPiece"),
        (lambda j: {**j, "pre_tokenizer": {"type": "BertPreTokenizer"}}, "pre_tokenizer BertPreTokenizer"),
        (lambda j: {**j, "normalizer": {"type": "Lowercase"}}, "normalizer Lowercase"),
        (lambda j: {**j, "model": {**j["model"], "dropout": 0.5}}, "BPE dropout"),
        (lambda j: {**j, "added_tokens": [{**t, "lstrip": True} for t in j["added_tokens"]]}, "lstrip"),
        (lambda j: {**j, "added_tokens": [{**t, "rstrip": True} for t in j["added_tokens"]]}, "rstrip"),
        (lambda j: {**j, "added_tokens": [{**t, "single_word": True} for t in j["added_tokens"]]}, "single_word"),
    ],
)
def test_unsupported_components_get_tokenizers_and_fast_raises(doctor, component):
    data = doctor(_demo_json())
    tok = _from_json(data)
    assert tok.encoder_backend == "tokenizers"
    assert component in tok.encoder_fallback_reason
    with pytest.raises(TokenizerError, match=component):
        _from_json(data, "fast")


def test_mixed_normalized_added_tokens_are_gated_off():
    """Two-stage added-token matching (non-normalized first) is not what a single pass does."""
    data = _demo_json()
    data["added_tokens"] += [
        {
            "id": 900,
            "content": "ab",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": False,
        },
        {
            "id": 901,
            "content": "xa",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": True,
            "special": False,
        },
    ]
    tok = _from_json(data)
    assert tok.encoder_backend == "tokenizers"
    assert "normalized" in tok.encoder_fallback_reason
    # The reference splits at the non-normalized "ab" first.
    assert tok.encode("xab") == tok._core.reference_encode("xab")


def _doctored_regex_json() -> dict:
    """A byte-level tokenizer whose Split regex means one thing to Oniguruma (`tokenizers`) and
    another to PCRE2 (`fastokens`): `\\h` is a hex digit in Ruby syntax, horizontal space in PCRE2.
    Every component is in the supported set, so only the self-check can catch it."""
    data = _demo_json()
    data["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\h+|\\s+|[^\\s\\h]+"}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }
    return data


def test_a_tokenizer_the_fast_engine_gets_wrong_is_caught_by_the_self_check():
    data = _doctored_regex_json()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tok = _from_json(data)
    assert tok.encoder_backend == "tokenizers"
    reason = tok.encoder_fallback_reason
    assert "self-check" in reason and "probe" in reason
    assert any("self-check" in str(w.message) for w in seen), "no warning named the probe"
    with pytest.raises(TokenizerError, match="self-check"):
        _from_json(data, "fast")


def test_encoder_choice_survives_pickling_and_the_drop_in_cache():
    data = json.dumps(_demo_json())
    for encoder in ("auto", "tokenizers"):
        tok = ChatTokenizer.from_parts(data, "{{ messages[0]['content'] }}", {}, encoder=encoder)
        copy = pickle.loads(pickle.dumps(tok))
        assert copy.encoder_backend == tok.encoder_backend
    with pytest.raises(ValueError, match="encoder must be"):
        ChatTokenizer.from_parts(data, None, {}, encoder="turbo")


def test_drop_in_encoder_choice():
    transformers = pytest.importorskip("transformers")
    from chatmask import dropin

    hf = transformers.AutoTokenizer.from_pretrained(str(require_shared("fixtures", "tokenizers", "qwen3")))
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    try:
        dropin.use_encoder("tokenizers")
        slow = dropin.tokenize_for_trainer(hf, chat)
        assert dropin.core_for(hf).encoder_backend == "tokenizers"
        dropin.use_encoder("auto")
        fast = dropin.tokenize_for_trainer(hf, chat)
        assert dropin.core_for(hf).encoder_backend == "fast"
    finally:
        dropin.use_encoder("auto")
    assert slow == fast
    with pytest.raises(ValueError):
        dropin.use_encoder("nope")


def test_adapters_carry_the_encoder_choice():
    from chatmask._adapter import RowTokenizer

    path = require_shared("fixtures", "tokenizers", "mistral-7b-v0.3")
    assert RowTokenizer(str(path), encoder="tokenizers").tokenizer.encoder_backend == "tokenizers"
    assert RowTokenizer(str(path)).tokenizer.encoder_backend == "fast"
    with pytest.raises(ValueError, match="encoder="):
        RowTokenizer(loaded("mistral-7b-v0.3"), encoder="fast")


# --- Fuzz -----------------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extra
    st = None


def _added_contents(name):
    data = json.loads(require_shared("fixtures", "tokenizers", name, "tokenizer.json").read_text(encoding="utf-8"))
    return sorted({t["content"] for t in data["added_tokens"]})[:64]


if st is not None:
    _pieces = st.one_of(
        st.text(min_size=0, max_size=40),
        st.text(st.characters(categories=["Zs", "Cc"]), max_size=12),
        st.text(st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=12),
        st.text(st.characters(categories=["Mn", "Me", "Mc"]), max_size=6).map(lambda m: "e" + m),
        st.sampled_from(["👩‍👩‍👧", "👍🏽", "🏳️‍🌈", "\r\n", "\n\n", "  ", "\t", "'s", "'ſ", "'S", "İ", "ß"]),
        st.integers(200, 3000).map(lambda n: "ab" * n),
        st.text(alphabet="abc xyz", min_size=100, max_size=600),
    )

    def _fuzz_texts(name):
        contents = _added_contents(name)
        token = st.sampled_from(contents)
        cut = token.flatmap(lambda c: st.integers(0, max(len(c) - 1, 0)).map(lambda i: c[:i] if i % 2 else c[i:]))
        return st.lists(st.one_of(_pieces, token, cut), min_size=1, max_size=8).map("".join)


def _fuzz(name, examples):
    if st is None:
        pytest.skip("hypothesis is not installed")
    tok = loaded(name)

    @settings(
        max_examples=examples, deadline=None, derandomize=IN_CI, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(text=_fuzz_texts(name))
    def check(text):
        compare_ids(tok, [text], name)
        ENCODER_TOTALS["fuzz_examples"] += 1

    check()


@pytest.mark.parametrize("name", FUZZ_TOKENIZERS)
def test_fuzz_fast_engine_equals_tokenizers(name):
    _fuzz(name, 150)


@pytest.mark.slow
@pytest.mark.parametrize("name", FUZZ_TOKENIZERS)
def test_fuzz_fast_engine_equals_tokenizers_long(name):
    _fuzz(name, 2500)
