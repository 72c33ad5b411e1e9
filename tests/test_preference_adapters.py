"""The preference task in the adapters: `chatmask.datasets.preference_fn` and
`chatmask.ray_data.TokenizePreferenceBatch` give, row for row, the pairs of
``tokenize_preference_batch`` on the same rows (element by element, counted), read Arrow rows as
``chatmask tokenize --task preference`` reads the same Parquet file, and name or mark bad rows.
Demo tokenizer only; under CI=true a missing `datasets` or `ray` fails instead of skipping."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_adapters import RAY_OWN_WARNINGS, arrow_table, in_input_order, list_column, run_ray, write_parts
from test_cli import read_parts

import chatmask
import chatmask.datasets
from chatmask.cli import main
from chatmask.demo import demo_conversations, demo_tokenizer
from chatmask.preference import FIELDS, FLAGS_COLUMN
from chatmask.ray_data import TokenizePreferenceBatch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TOK = demo_tokenizer()
COMPARED = {"pairs": 0, "values": 0}
SIDE = {name: name.split("_")[0] for name in FIELDS}


def demo_pairs(n: int) -> list[dict[str, Any]]:
    """`n` explicit rows from the demo conversations, every completion a list of messages (one
    Arrow type per column): prompt = the messages before the last assistant message, chosen =
    that message, rejected = another row's last assistant text."""
    usable = []
    for row in demo_conversations():
        last = max((i for i, m in enumerate(row["messages"]) if m["role"] == "assistant"), default=0)
        text = row["messages"][last].get("content")
        if last > 0 and isinstance(text, str) and text:
            usable.append((row, last, text))
    assert len(usable) >= 3
    pairs = []
    for k in range(n):
        row, last, text = usable[k % len(usable)]
        other = usable[(k + 1) % len(usable)][2]
        pair = {
            "id": f"{row['id']}-{k}",
            "prompt": row["messages"][:last],
            "chosen": [row["messages"][last]],
            "rejected": [{"role": "assistant", "content": other if other != text else other + " (no)"}],
        }
        if row.get("tools"):
            pair["tools"] = row["tools"]
        pairs.append(pair)
    return pairs


def implicit(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same pairs as whole conversations (implicit rows)."""
    return [
        {
            "id": p["id"],
            "chosen": p["prompt"] + p["chosen"],
            "rejected": p["prompt"] + p["rejected"],
            **({"tools": p["tools"]} if "tools" in p else {}),
        }
        for p in pairs
    ]


def columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def check_pairs(rows: list[Any], out: Any, policy: chatmask.MaskPolicy | None = None) -> int:
    """An adapter's Arrow output, one row per input row, against tokenize_preference_batch on the
    same Python rows: the five token columns element by element, the flags per row, failed and
    dropped rows empty with the batch API's reason. Returns the pairs with tokens."""
    ref = TOK.tokenize_preference_batch(rows, policy, on_error="skip")
    n = len(rows)
    assert out.num_rows == n
    done = ref.rows.tolist()
    for name in FIELDS:
        offsets, values = list_column(out.column(name))
        lengths = np.zeros(n, dtype=np.int64)
        lengths[done] = np.diff(getattr(ref, f"{SIDE[name]}_offsets"))
        np.testing.assert_array_equal(np.diff(offsets), lengths, err_msg=name)
        np.testing.assert_array_equal(values, getattr(ref, name), err_msg=name)
        assert values.dtype == (np.int64 if "labels" in name else np.int32), name
        COMPARED["values"] += len(values)
    flags: list[list[str]] = [[] for _ in range(n)]
    for k, i in enumerate(done):
        flags[i] = ref.flags[k]
    assert out.column(FLAGS_COLUMN).to_pylist() == flags
    if "error" in out.column_names:
        assert {i: e for i, e in enumerate(out.column("error").to_pylist()) if e} == dict(ref.errors)
    else:
        assert not ref.errors
    if "dropped" in out.column_names:
        assert [i for i, d in enumerate(out.column("dropped").to_pylist()) if d] == ref.dropped
    else:
        assert not ref.dropped
    COMPARED["pairs"] += len(done)
    return len(done)


@pytest.fixture(scope="module", autouse=True)
def report_compared(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and COMPARED["pairs"]:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\npreference adapters vs tokenize_preference_batch: {COMPARED['pairs']} pairs, "
                f"{COMPARED['values']} ids + labels compared element by element, 0 mismatches"
            )


def test_datasets_preference_equals_batch_api(hf):
    rows = demo_pairs(120)
    for shape in (rows, implicit(rows)):
        ds = hf.Dataset.from_dict(columns(shape))
        # Arrow gives every message struct every key: the adapter must drop those nulls.
        assert any(m.get("tool_calls", 0) is None for m in ds[0]["prompt" if "prompt" in shape[0] else "chosen"])
        out = ds.map(chatmask.datasets.preference_fn(TOK), batched=True, batch_size=32)
        assert out.column_names == [*ds.column_names, *FIELDS, FLAGS_COLUMN]
        schema = out.data.schema
        assert schema.field("prompt_input_ids").type == pa.list_(pa.int32())
        assert schema.field("chosen_labels").type == pa.list_(pa.int64())
        assert schema.field(FLAGS_COLUMN).type == pa.list_(pa.string())
        assert check_pairs(shape, out.data.table) == len(shape)


def test_datasets_flags_after_unflagged_batches(hf, monkeypatch):
    """A flag in a later batch than the first (all pairs unflagged) keeps the column list<string>."""
    from chatmask._preference_adapter import PreferenceRows

    real = PreferenceRows.tokenize

    def flag_row_13(self, columns, *args, **kwargs):
        out = real(self, columns, *args, **kwargs)
        out.flags = [["straddles_split:chosen"] if i.endswith("-13") else f for i, f in zip(columns["id"], out.flags)]
        return out

    monkeypatch.setattr(PreferenceRows, "tokenize", flag_row_13)
    ds = hf.Dataset.from_dict(columns(demo_pairs(16)))
    out = ds.map(chatmask.datasets.preference_fn(TOK), batched=True, batch_size=4)
    assert out.data.schema.field(FLAGS_COLUMN).type == pa.list_(pa.string())
    assert [i for i, f in enumerate(out[FLAGS_COLUMN]) if f] == [13]
    assert out[13][FLAGS_COLUMN] == ["straddles_split:chosen"]


def test_datasets_preference_fingerprint_and_policy(hf):
    rows = demo_pairs(40)
    ds = hf.Dataset.from_dict(columns(rows))
    fn = chatmask.datasets.preference_fn(TOK, on_error="mark")
    from datasets.fingerprint import Hasher

    again = chatmask.datasets.preference_fn(demo_tokenizer(), on_error="mark")
    assert pickle.dumps(fn) == pickle.dumps(again) and Hasher.hash(fn) == Hasher.hash(again)
    policy = chatmask.MaskPolicy(train_on_inputs=True, train_on_eos="none")
    assert Hasher.hash(fn) != Hasher.hash(chatmask.datasets.preference_fn(TOK, policy, on_error="mark"))
    assert repr(fn).startswith("chatmask.datasets.preference_fn(policy=")
    single = ds.map(fn, batched=True, batch_size=8, remove_columns=ds.column_names)
    multi = ds.map(fn, batched=True, batch_size=8, num_proc=2, remove_columns=ds.column_names)
    assert multi.data.table.equals(single.data.table)
    check_pairs(rows, single.data.table)
    # Another policy's labels, and overflow="drop": a dropped column, dropped rows empty.
    out = ds.map(chatmask.datasets.preference_fn(TOK, policy), batched=True, remove_columns=ds.column_names)
    check_pairs(rows, out.data.table, policy)
    lengths = sorted(len(TOK.tokenize(p["prompt"] + p["chosen"], policy)["input_ids"]) for p in rows)
    dropping = chatmask.MaskPolicy(max_length=lengths[len(lengths) // 2], overflow="drop")
    out = ds.map(chatmask.datasets.preference_fn(TOK, dropping), batched=True, remove_columns=ds.column_names)
    assert out.column_names == [*FIELDS, FLAGS_COLUMN, "dropped"]
    assert 0 < check_pairs(rows, out.data.table, dropping) < len(rows)


def test_datasets_preference_bad_rows_raise_or_are_marked(hf):
    rows = demo_pairs(10)
    rows[3] = {**rows[3], "rejected": rows[3]["chosen"]}  # no preference to learn
    rows[6] = {**rows[6], "prompt": []}
    ds = hf.Dataset.from_dict(columns(rows))
    with pytest.raises(chatmask.ConversationError) as info:
        ds.map(chatmask.datasets.preference_fn(TOK), batched=True, batch_size=4, with_indices=True)
    assert info.value.row == 3 and info.value.batch_row == 3
    assert str(info.value).startswith(f"dataset row 3 (row 3 of the batch, id '{rows[3]['id']}'): ")
    assert "same conversation" in str(info.value)
    out = ds.map(chatmask.datasets.preference_fn(TOK, on_error="mark"), batched=True, batch_size=4)
    assert len(out) == len(rows)  # nothing dropped
    errors = out["error"]
    assert [i for i, e in enumerate(errors) if e] == [3, 6]
    assert "same conversation" in errors[3] and "'prompt' is an empty list" in errors[6]
    assert out[6]["chosen_input_ids"] == [] and out[6][FLAGS_COLUMN] == []
    assert check_pairs(rows, out.data.table) == len(rows) - 2
    # A plain batch (no Arrow types) whose row is not readable: named under raise, marked under mark.
    bad = columns(rows[:4])
    bad["chosen"][1] = 7
    with pytest.raises(chatmask.ConversationTypeError, match=r"^dataset row 11 \(row 1 of the batch, id "):
        chatmask.datasets.preference_fn(TOK)(bad, [10, 11, 12, 13])
    marked = chatmask.datasets.preference_fn(TOK, on_error="mark")(bad)
    assert "'chosen' must be a str" in marked["error"][1] and len(marked["prompt_input_ids"][1]) == 0
    with pytest.raises(TypeError, match="MaskPolicy"):
        chatmask.datasets.preference_fn(TOK, "all")  # type: ignore[arg-type]


def test_tokenize_preference_batch_on_arrow_and_mappings():
    rows = demo_pairs(40)
    table = arrow_table(rows)
    out = TokenizePreferenceBatch(TOK, on_error="mark")(table)
    assert out.column_names == ["id", *FIELDS, FLAGS_COLUMN, "error"]
    assert check_pairs(rows, out) == len(rows)
    kept = TokenizePreferenceBatch(TOK, keep_columns=["prompt"])(table)
    assert kept.column_names == ["prompt", *FIELDS, FLAGS_COLUMN]
    mapping = TokenizePreferenceBatch(TOK)({k: np.array(v, dtype=object) for k, v in columns(implicit(rows)).items()})
    assert list(mapping) == ["id", *FIELDS, FLAGS_COLUMN]
    ref = TOK.tokenize_preference_batch(implicit(rows))
    for name in FIELDS:
        assert [x.tolist() for x in mapping[name]] == [ref[k][name].tolist() for k in range(len(ref))]
    with pytest.raises(KeyError, match="no column 'rejected'"):
        TokenizePreferenceBatch(TOK)(table.drop_columns(["rejected"]))


def test_the_cli_and_the_adapter_read_parquet_alike(tmp_path):
    """One Parquet file (explicit and implicit rows, struct nulls, a tools JSON string with a
    null default) through ``chatmask tokenize --task preference`` and through the Ray adapter."""
    import json

    rows = demo_pairs(12)
    for k in range(0, len(rows), 3):
        rows[k] = {"id": rows[k]["id"], **implicit([rows[k]])[0]}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "default": None}}}
    rows = [{"prompt": None, **r, "tools": json.dumps([tool]) if k % 2 else None} for k, r in enumerate(rows)]
    src = tmp_path / "in.parquet"
    pq.write_table(arrow_table(rows), src)
    assert (
        main(
            ["tokenize", str(src), "-o", str(tmp_path / "out"), "--tokenizer", "demo"]
            + ["--task", "preference", "--quiet"]
        )
        == 0
    )
    cli = read_parts(tmp_path / "out")
    adapter = TokenizePreferenceBatch(TOK)(pq.read_table(src))
    assert cli.column("row").to_pylist() == list(range(len(rows)))
    for name in (*FIELDS, FLAGS_COLUMN):
        assert cli.column(name).to_pylist() == adapter.column(name).to_pylist(), name
    python_rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    for r in python_rows:
        if "tools" in r:
            r["tools"] = json.loads(r["tools"])  # parsed last, its null kept (rows rule 4)
    assert check_pairs(python_rows, adapter) == len(rows)


@RAY_OWN_WARNINGS
def test_ray_data_preference(ray_cluster, tmp_path: Path):
    rows = demo_pairs(2_000)
    rows[5] = {**rows[5], "rejected": rows[5]["chosen"]}
    src = write_parts(arrow_table(rows), tmp_path / "in", 2)
    result = run_ray(ray_cluster, src, tmp_path / "out", TOK, cls=TokenizePreferenceBatch, on_error="mark")
    result = in_input_order(result, rows)
    assert result.column_names == ["id", *FIELDS, FLAGS_COLUMN, "error"]
    assert check_pairs(rows, result) == len(rows) - 1
