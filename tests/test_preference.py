"""Preference pairs (`tokenize_preference`, `tokenize_preference_batch`): the concatenation
guarantee against `tokenize`, the flag rule, row shapes, bad rows, and a hypothesis test.

The fixture part runs on every fixture tokenizer: the first CI_PAIRS qualifying rows of each
conversation file unmarked, the whole corpus under `-m slow`. Counts are printed (run with -s).
"""

from __future__ import annotations

import numpy as np
import pytest
from _parity import TOKENIZERS_DIR
from _preference_pairs import branches, date_kwargs, fixture_pairs, implicit
from conftest import IN_CI, fixture_names, require_shared

import chatmask
from chatmask import ChatTokenizer, ConversationError, ConversationTypeError, MaskPolicy, PreferenceBatch
from chatmask.demo import demo_tokenizer
from chatmask.preference import PREFERENCE_POLICY

CI_PAIRS = 4


@pytest.fixture(scope="module")
def demo() -> ChatTokenizer:
    return demo_tokenizer()


def first_owned(index: np.ndarray, n_prompt: int) -> int:
    owned = np.flatnonzero(index >= n_prompt)
    assert len(owned), "the completion owns no token"
    return int(owned[0])


def check_pair(tok: ChatTokenizer, pair: dict, out: dict, policy: MaskPolicy = PREFERENCE_POLICY, **kwargs) -> int:
    """The guarantee and the flag rule for one pair, against `tokenize` of each whole branch,
    computed independently; returns the number of token ids and labels compared."""
    n_prompt = len(pair["prompt"])
    compared = 0
    prefixes = []
    for name, conversation in zip(("chosen", "rejected"), branches(pair)):
        row = {"messages": conversation, **({"tools": pair["tools"]} if "tools" in pair else {})}
        full = tok.tokenize(row, policy, **kwargs)
        assert full is not None
        split = first_owned(full["message_index"], n_prompt)
        prompt = out["prompt_input_ids"] if name == "chosen" else full["input_ids"][:split]
        ids = np.concatenate([prompt, out[f"{name}_input_ids"]])
        assert len(prompt) == split and len(ids) == len(full["input_ids"])
        assert (ids == full["input_ids"]).all()
        assert (out[f"{name}_labels"] == full["labels"][split:]).all()
        assert (out[f"{name}_input_ids"] == full["input_ids"][split:]).all()
        compared += 2 * len(full["input_ids"]) - split
        prefixes.append(full["input_ids"][:split])
        straddles = bool(full["straddles_start"][split])
        assert (f"straddles_split:{name}" in out["flags"]) == straddles
        late = full["message_index"][split:]
        assert (f"prompt_after_completion:{name}" in out["flags"]) == bool(((late >= 0) & (late < n_prompt)).any())
    same = len(prefixes[0]) == len(prefixes[1]) and (prefixes[0] == prefixes[1]).all()
    assert ("prompt_differs" in out["flags"]) == (not same)
    return compared


def _fixture_run(name: str, limit: int | None) -> None:
    require_shared("fixtures", "tokenizers", name)
    tok = ChatTokenizer.from_pretrained(TOKENIZERS_DIR / name)
    pairs = list(fixture_pairs(limit))
    assert pairs, "no fixture conversation has two assistant turns"
    kwargs = date_kwargs()
    batch = tok.tokenize_preference_batch([p for _, p in pairs], on_error="skip", **kwargs)
    assert isinstance(batch, PreferenceBatch)
    failed = {row for row, _ in batch.errors}
    assert len(batch) + len(failed) == len(pairs)
    compared = text_checked = 0
    flags: dict[str, int] = {}
    for k, row in enumerate(batch.rows.tolist()):
        row_id, pair = pairs[row]
        out = batch[k]
        compared += check_pair(tok, pair, out, **kwargs)
        for flag in out["flags"]:
            flags[flag] = flags.get(flag, 0) + 1
        # The completion's text, where the template prints it (Llama 3 drops the content of a
        # tool-call message), is on the completion side (unless a token straddles the split).
        content = pair["chosen"].get("content")
        if isinstance(content, str) and content.strip() and not out["flags"]:
            whole = np.concatenate([out["prompt_input_ids"], out["chosen_input_ids"]])
            if content.strip()[:200] in tok._core.decode(whole.tolist(), False):
                assert content.strip()[:200] in tok._core.decode(out["chosen_input_ids"].tolist(), False), row_id
                text_checked += 1
    for row in failed:  # a pair fails only where a branch fails in tokenize, or its completion owns no token
        pair = pairs[row][1]
        with pytest.raises(chatmask.ChatMaskError):
            for conversation in branches(pair):
                full = tok.tokenize({"messages": conversation, "tools": pair.get("tools")}, PREFERENCE_POLICY, **kwargs)
                if full is not None and not (full["message_index"] >= len(pair["prompt"])).any():
                    raise ConversationError("the completion owns no token")
    print(
        f"\n{name}: {len(pairs)} pairs, {len(batch)} split, {len(failed)} raised alike in tokenize, {compared} ids+labels "
        f"compared element by element, {text_checked} completion texts found on the completion side, flags {flags}"
    )
    assert compared > 0 and len(batch) > 0 and text_checked > 0


@pytest.mark.parametrize("name", fixture_names())
def test_pairs_concatenate_to_the_whole_tokenization(name):
    _fixture_run(name, CI_PAIRS)


@pytest.mark.slow
@pytest.mark.parametrize("name", fixture_names())
def test_pairs_concatenate_to_the_whole_tokenization_whole_corpus(name):
    _fixture_run(name, None)


@pytest.mark.parametrize("name", ["qwen3", "llama3", "mistral-7b-v0.3"])
def test_explicit_and_implicit_rows_agree(name):
    require_shared("fixtures", "tokenizers", name)
    tok = ChatTokenizer.from_pretrained(TOKENIZERS_DIR / name)
    pairs = [p for _, p in fixture_pairs(2)]
    explicit = tok.tokenize_preference_batch(pairs, on_error="skip", **date_kwargs())
    implied = tok.tokenize_preference_batch([implicit(p) for p in pairs], on_error="skip", **date_kwargs())
    assert explicit.rows.tolist() == implied.rows.tolist() and len(explicit) > 0
    assert explicit.flags == implied.flags
    for field in chatmask.preference.FIELDS:
        assert (getattr(explicit, field) == getattr(implied, field)).all(), field
    one = tok.tokenize_preference(pairs[int(explicit.rows[0])], **date_kwargs())
    assert all((one[f] == explicit[0][f]).all() for f in chatmask.preference.FIELDS)
    assert one["prompt_input_ids"].dtype == np.int64


PROMPT = [{"role": "user", "content": "Name a colour."}]


def test_shapes_of_a_completion(demo):
    as_text = demo.tokenize_preference({"prompt": PROMPT, "chosen": "Blue.", "rejected": "Seven."})
    as_dict = demo.tokenize_preference(
        {"prompt": PROMPT, "chosen": {"role": "assistant", "content": "Blue."}, "rejected": "Seven."}
    )
    as_list = demo.tokenize_preference(
        {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": "Seven."}
    )
    for out in (as_dict, as_list):
        assert all((out[f] == as_text[f]).all() for f in chatmask.preference.FIELDS)
    decode = demo._core.decode
    assert decode(as_text["chosen_input_ids"].tolist(), False) == "Blue.<|im_end|>\n"
    assert decode(as_text["prompt_input_ids"].tolist(), False).endswith("<|im_start|>assistant\n")
    assert as_text["flags"] == []
    # The default policy trains the completion and its end token, not the newline after it.
    trained = [t for t, label in zip(as_text["chosen_input_ids"], as_text["chosen_labels"]) if label != -100]
    assert decode(trained, False) == "Blue.<|im_end|>"


def test_prompt_history_is_not_trained_and_a_policy_applies(demo):
    prompt = PROMPT + [{"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another."}]
    out = demo.tokenize_preference({"prompt": prompt, "chosen": "Blue.", "rejected": "Green."})
    assert (out["chosen_labels"] != -100).any() and "prompt_labels" not in out
    untrained_eot = demo.tokenize_preference(
        {"prompt": prompt, "chosen": "Blue.", "rejected": "Green."}, MaskPolicy(train_on_eos="none")
    )
    assert int((untrained_eot["chosen_labels"] != -100).sum()) == int((out["chosen_labels"] != -100).sum()) - 1


def test_a_merge_across_the_split_is_flagged():
    tok = demo_tokenizer("metaspace")
    # The generation prompt ends in "\n" and the completion opens with one: the demo metaspace
    # tokenizer has a "\n\n" token, half prompt, half completion. The chosen branch's prompt
    # then lacks its last "\n", so the two branches' prompts differ too.
    out = tok.tokenize_preference({"prompt": PROMPT, "chosen": "\nBlue", "rejected": "Seven."})
    assert out["flags"] == ["prompt_differs", "straddles_split:chosen"]
    decode = tok._core.decode
    assert decode(out["chosen_input_ids"][:1].tolist(), False) == "\n\n"
    assert decode(out["prompt_input_ids"].tolist(), False).endswith("assistant")
    pair = {"prompt": PROMPT, "chosen": {"role": "assistant", "content": "\nBlue"}}
    check_pair(tok, pair | {"rejected": {"role": "assistant", "content": "Seven."}}, out)
    assert tok.tokenize_preference({"prompt": PROMPT, "chosen": "Blue", "rejected": "Seven."})["flags"] == []


BAD_ROWS = [
    (["not", "a", "dict"], ConversationTypeError, "must be a dict"),
    ({"chosen": "x"}, ConversationError, "missing \\['rejected'\\]"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b"}, ConversationTypeError, "'prompt' must be a list"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, ConversationError, "'prompt' is an empty list"),
    ({"prompt": PROMPT, "chosen": [], "rejected": "b"}, ConversationError, "'chosen' is an empty list"),
    ({"prompt": PROMPT, "chosen": 3, "rejected": "b"}, ConversationTypeError, "'chosen' must be a str"),
    (
        {"prompt": PROMPT, "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
        ConversationError,
        "starts with a 'user' message",
    ),
    (
        {"chosen": PROMPT + [{"role": "assistant", "content": "a"}]}
        | {"rejected": PROMPT + [{"role": "assistant", "content": "a"}]},
        ConversationError,
        "same conversation",
    ),
    (
        {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
        ConversationError,
        "share no opening message",
    ),
    (
        {"chosen": PROMPT, "rejected": PROMPT + [{"role": "assistant", "content": "a"}]},
        ConversationError,
        "is a prefix",
    ),
    ({"prompt": PROMPT, "chosen": "", "rejected": "b"}, ConversationError, "owns no token"),
    ({"chosen": "a", "rejected": "b"}, ConversationTypeError, "'chosen' must be a list"),
]


@pytest.mark.parametrize(("row", "error", "reason"), BAD_ROWS)
def test_bad_rows_raise_naming_the_reason(demo, row, error, reason):
    with pytest.raises(error, match=reason):
        demo.tokenize_preference(row)
    good = {"prompt": PROMPT, "chosen": "Blue.", "rejected": "Seven."}
    with pytest.raises(error, match=f"row 1: .*{reason}") as raised:
        demo.tokenize_preference_batch([good, row])
    assert raised.value.row == 1
    batch = demo.tokenize_preference_batch([good, row, good], on_error="skip")
    assert batch.rows.tolist() == [0, 2] and [r for r, _ in batch.errors] == [1]


def test_batch_views_and_arrow(demo):
    rows = [{"prompt": PROMPT, "chosen": f"Blue {i}.", "rejected": "Seven."} for i in range(5)]
    batch = demo.tokenize_preference_batch(rows, num_threads=2)
    assert len(batch) == 5 and batch.flags == [[]] * 5 and batch.errors == []
    assert (batch[-1]["chosen_input_ids"] == demo.tokenize_preference(rows[4])["chosen_input_ids"]).all()
    with pytest.raises(IndexError):
        batch[5]
    pa = pytest.importorskip("pyarrow") if not IN_CI else __import__("pyarrow")
    table = batch.to_arrow()
    assert table.num_rows == 5 and table.column("flags").to_pylist() == [[]] * 5
    assert table.column("chosen_input_ids")[3].as_py() == batch[3]["chosen_input_ids"].tolist()
    assert isinstance(table, pa.Table)
    dropped = demo.tokenize_preference_batch(rows[:2], MaskPolicy(max_length=3, overflow="drop"))
    assert len(dropped) == 0 and dropped.dropped == [0, 1]


# --- hypothesis: random small conversations ---------------------------------------------------

if IN_CI:  # a test dependency: missing is a failure under CI=true, a skip elsewhere
    import hypothesis
else:
    hypothesis = pytest.importorskip("hypothesis")
from hypothesis import strategies as st  # noqa: E402

_PIECES = list("ab Zé漢🙂\n\t .,:<>/|_") + ["<think>", "</think>", "\n\n", "Hello"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=8).map("".join)


@st.composite
def random_pairs(draw):
    n_turns = draw(st.integers(0, 2))
    prompt = [{"role": "system", "content": draw(_TEXT)}] if draw(st.booleans()) else []
    for _ in range(n_turns):
        prompt += [{"role": "user", "content": draw(_TEXT)}, {"role": "assistant", "content": draw(_TEXT)}]
    prompt.append({"role": "user", "content": draw(_TEXT)})
    chosen, rejected = draw(_TEXT), draw(_TEXT)
    return {
        "prompt": prompt,
        "chosen": {"role": "assistant", "content": chosen},
        "rejected": {"role": "assistant", "content": rejected},
    }


def _hypothesis_tokenizers() -> list[str]:
    return ["demo-bytelevel", "demo-metaspace"] + [
        n for n in ("qwen3", "mistral-7b-v0.3") if (TOKENIZERS_DIR / n).exists()
    ]


@pytest.mark.parametrize("name", _hypothesis_tokenizers())
def test_random_pairs_keep_the_guarantee_and_the_flag_rule(name):
    tok = (
        demo_tokenizer(name.split("-")[1])
        if name.startswith("demo")
        else ChatTokenizer.from_pretrained(TOKENIZERS_DIR / name)
    )
    seen = {"split": 0, "raised": 0, "flagged": 0}

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @hypothesis.given(random_pairs())
    def run(pair):
        try:
            out = tok.tokenize_preference(pair)
        except ConversationError as e:
            if pair["chosen"] == pair["rejected"]:  # no preference to learn: refused as such
                assert "same conversation" in str(e)
                seen["raised"] += 1
                return
            # Otherwise only a completion that owns no token (or a template refusing the row) fails.
            for conversation in branches(pair):
                try:
                    full = tok.tokenize({"messages": conversation}, PREFERENCE_POLICY)
                except chatmask.ChatMaskError:
                    seen["raised"] += 1
                    return
                if full is not None and not (full["message_index"] >= len(pair["prompt"])).any():
                    assert "owns no token" in str(e)
                    seen["raised"] += 1
                    return
            raise
        check_pair(tok, pair, out)
        seen["split"] += 1
        seen["flagged"] += bool(out["flags"])

    run()
    print(f"\n{name}: {seen}")
    assert seen["split"] > 0


def test_straddles_start_runs_along_a_policy_batch():
    tok = demo_tokenizer("metaspace")
    rows = [{"messages": PROMPT + [{"role": "assistant", "content": c}]} for c in ("\nBlue", "Blue")]
    batch = tok.tokenize_batch(rows, policy=PREFERENCE_POLICY)
    assert batch.straddles_start is not None and batch.straddles_start.dtype == np.bool_
    assert len(batch.straddles_start) == len(batch.input_ids)
    for i, row in enumerate(rows):
        one = tok.tokenize(row, PREFERENCE_POLICY)
        assert (batch.straddles_start[batch.offsets[i] : batch.offsets[i + 1]] == one["straddles_start"]).all()
    assert batch.straddles_start[: batch.offsets[1]].sum() == 1 and not batch.straddles_start[batch.offsets[1] :].any()


def test_the_trl_reimplementation_and_its_causes():
    from _preference_pairs import trl_cause, trl_pair

    tok = demo_tokenizer("metaspace")
    pair = {"prompt": PROMPT, "chosen": {"role": "assistant", "content": "Blue"}}
    pair["rejected"] = {"role": "assistant", "content": "Seven."}
    exact, trl = tok.tokenize_preference(pair), trl_pair(tok, pair)
    assert all(trl[f] == exact[f].tolist() for f in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    # A completion opening with "\n" merges with the generation prompt's "\n": TRL's prompt is not
    # a token prefix of prompt + chosen, and it slices one token off.
    merged = pair | {"chosen": {"role": "assistant", "content": "\nBlue"}}
    trl = trl_pair(tok, merged)
    assert trl["chosen_full"][: len(trl["prompt_input_ids"])] != trl["prompt_input_ids"]
    assert trl_cause(tok, trl) == "merge across the boundary"
    assert trl["chosen_input_ids"] != tok.tokenize_preference(merged)["chosen_input_ids"].tolist()
    require_shared("fixtures", "tokenizers", "mistral-7b-v0.3")
    mistral = ChatTokenizer.from_pretrained(TOKENIZERS_DIR / "mistral-7b-v0.3")
    history = [{"role": "system", "content": "Be brief."}, *PROMPT, {"role": "assistant", "content": "Red."}]
    rewritten = pair | {"prompt": history + [{"role": "user", "content": "Another."}]}
    trl = trl_pair(mistral, rewritten)
    assert trl_cause(mistral, trl) == "history rewritten"
    out = mistral.tokenize_preference(rewritten)
    check_pair(mistral, rewritten, out)
    assert trl["prompt_input_ids"] != out["prompt_input_ids"].tolist()
