"""The core's JSONL reader (``chatmask.rows.parse_lines``, serde_json in Rust) against the Python
row parser (``chatmask.rows.parse``): the same rows, the same values (types and key order
included), the same errors, the same tokens and labels.

Every line the core reads is compared value by value with what ``json.loads`` and the null rules
give; every line it leaves to Python must be one Python reads too (then the result is Python's by
construction). Counts are printed so a run shows what it compared.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from conftest import conversation_file_names, require_shared
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chatmask
from chatmask.rows import CoreRow, Fields, parse, parse_lines

POLICY = chatmask.MaskPolicy()
SHAREGPT = chatmask.MaskPolicy(field_messages="conversations", field_system="system", drop_system_message=True)
MAPPED = chatmask.MaskPolicy(message_property_mappings={"role": "speaker", "content": "text"})


def typed(value: Any) -> Any:
    """`value` with its types and dict key order visible, so == compares them too."""
    if isinstance(value, dict):
        return ("dict", [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    return (type(value).__name__, value)


def python_values(conversation: dict, fields: Fields) -> Any:
    return [conversation.get(fields.messages), conversation.get(fields.tools), conversation.get(fields.system)]


def compare_lines(lines: list[bytes], fields: Fields, policy: chatmask.MaskPolicy | None) -> tuple[int, int]:
    """(rows the core read, rows left to Python), after checking each against `rows.parse`."""
    core_read = python_read = 0
    for line, got in zip(lines, parse_lines(lines, fields, policy)):
        want = parse(line, fields, policy)
        if not isinstance(got.conversation, CoreRow):
            assert got == want, line
            python_read += 1
            continue
        core_read += 1
        assert want.error is None, (line, want.error)
        assert (got.id, got.finish_reason) == (want.id, want.finish_reason), line
        messages, tools, system = json.loads(got.conversation.core.values_json())
        conversation = want.conversation
        if isinstance(conversation, dict):
            expect = python_values(conversation, Fields.of_policy(policy) if policy else fields)
        else:
            expect = [conversation, None, None]
        assert typed([messages, tools, system]) == typed(expect), line
        spec = policy.shape_spec() if policy is not None else None
        if spec is not None:  # the core's shaping == MaskPolicy.shape
            shaped = json.loads(got.conversation.core.values_json(spec))[0]
            assert typed(shaped) == typed(policy.shape(conversation)[0]), line
    return core_read, python_read


EDGE_LINES = [
    b'{"messages": [{"role": "user", "content": "hi"}], "id": 3}',
    b'{"messages": [{"role": "user", "content": "a", "role": "assistant"}]}',  # a repeated key
    b'{"messages": [{"role": "user", "content": "x", "n": 1.0, "m": 1, "z": -0.0, "e": 1e5}]}',
    b'{"messages": [{"role": "user", "content": "x", "n": -0}]}',  # Python: int 0
    b'{"messages": [{"role": 6.857655085990551e+302}]}',  # needs serde_json's float_roundtrip
    b'{"messages": [{"role": "user", "content": "x", "n": 123456789012345678901234567890}]}',
    b'{"messages": [{"role": "user", "content": "x", "n": 1e400}]}',  # Python: inf
    b'{"messages": [{"role": "user", "content": "x", "n": NaN}]}',
    b'{"messages": [{"role": "user", "content": "tab\there"}]}',  # a raw control character
    b'{"messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate escape
    b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00 \\u00e9"}]}',
    b'{"messages": [{"role": "user", "content": null, "tool_calls": null}], "tools": null}',
    b'{"messages": [], "tools": "[{\\"type\\": \\"function\\", \\"default\\": null}]"}',
    b'{"messages": [], "tools": "{not json"}',
    b'{"messages": [], "tools": {"a": 1}}',
    b'{"messages": [], "tools": "7"}',
    b'{"messages": [1, 2]}',
    b'{"messages": "hello"}',
    b'{"id": "no messages"}',
    b'[{"role": "user", "content": "a list row"}]',
    b'"a string"',
    b"",
    b"   ",
    b'{"messages": []',
    b'{"messages": []} trailing',
    b"\xef\xbb\xbf{}",
    b'{"messages": [], "id": 1.5}',
    b'{"messages": [], "id": true}',
    b'{"messages": [], "id": {"a": 1}}',
    b'{"messages": [], "finish_reason": "length"}',
    b'{"messages": [], "finish_reason": 3}',
    b'{"messages": [], "system": "be brief"}',
    b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "s"}',
    b'{"messages": [{"speaker": "user", "text": "q", "role": "x"}]}',
    b"\xff\xfe",
    b"[" * 200 + b"]" * 200,
    '{"messages": [{"role": "user", "content": "ü日本語 ∑"}]}'.encode(),
]

FIELD_SETS = [
    (Fields(), None),
    (Fields(finish_reason="finish_reason"), None),
    (Fields.of_policy(POLICY), POLICY),
    (Fields.of_policy(SHAREGPT), SHAREGPT),
    (Fields.of_policy(MAPPED), MAPPED),
]


@pytest.mark.parametrize("fields, policy", FIELD_SETS, ids=lambda v: repr(v)[:40])
def test_edge_lines_read_as_python_reads_them(fields, policy):
    core_read, python_read = compare_lines(EDGE_LINES, fields, policy)
    print(f"edge lines: {core_read} read by the core, {python_read} left to Python, all equal")
    assert core_read >= 2 and python_read >= 20  # both paths are exercised


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)
MESSAGE = st.dictionaries(
    st.sampled_from(["role", "content", "from", "value", "tool_calls", "name", "x"]), JSON_VALUES, max_size=5
)
ROW = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=4)},
    optional={
        "tools": st.one_of(st.none(), st.lists(JSON_VALUES, max_size=2), JSON_VALUES.map(json.dumps)),
        "id": st.one_of(st.text(max_size=5), st.integers(min_value=-(10**20), max_value=10**20), JSON_VALUES),
        "finish_reason": st.one_of(st.none(), st.sampled_from(["stop", "length"]), JSON_VALUES),
        "system": JSON_VALUES,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(ROW, min_size=1, max_size=8), ensure_ascii=st.booleans())
def test_random_rows_read_as_python_reads_them(rows, ensure_ascii):
    lines = [json.dumps(r, ensure_ascii=ensure_ascii).encode() for r in rows]
    for fields, policy in FIELD_SETS:
        compare_lines(lines, fields, policy)


def _corpus_lines() -> list[bytes]:
    lines = []
    for name in conversation_file_names():
        path = require_shared("fixtures", "conversations", name)
        lines.extend(line for line in path.read_bytes().splitlines() if line.strip())
    return lines


def test_fixture_corpus_rows_and_tokens_equal():
    """Every fixture conversation: values equal, then the same tokens and labels from the core's
    rows as from Python's, under the default policy and in last-turn mode."""
    lines = _corpus_lines()
    fields = Fields.of_policy(POLICY)
    core_read, python_read = compare_lines(lines, fields, POLICY)
    assert core_read >= 0.9 * len(lines)
    tok = chatmask.ChatTokenizer.from_pretrained(require_shared("fixtures", "tokenizers", "qwen3"))
    compared = 0
    for policy, rows_fields in [(POLICY, fields), (None, Fields())]:
        parsed = parse_lines(lines, rows_fields, policy)
        good = [p.conversation for p in parsed if p.error is None]
        python_rows = [c.python() if isinstance(c, CoreRow) else c for c in good]
        kw: dict[str, Any] = {"policy": policy} if policy else {"mode": "last"}
        got = tok.tokenize_batch(good, on_error="skip", **kw)
        want = tok.tokenize_batch(python_rows, on_error="skip", **kw)
        for name in ["input_ids", "labels", "offsets", "rows"] + (["message_index"] if policy else []):
            a, b = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
            assert a.shape == b.shape and (a == b).all(), name
            compared += a.size
        assert got.errors == want.errors
    print(
        f"fixture corpus: {len(lines)} lines ({core_read} read by the core, {python_read} by Python), {compared} output values equal"
    )
