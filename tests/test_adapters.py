"""Ecosystem adapters: `chatmask.datasets.map_fn` (Hugging Face datasets) and
`chatmask.ray_data.TokenizeBatch` (Ray Data), plus the pickling they rely on.

Every adapter output is compared element by element with `ChatTokenizer.tokenize_batch` on the
original (JSON) rows, failures included. The core part runs on the built-in demo; the fixture
part reads ../shared. Under CI=true a missing `datasets` or `ray` fails instead of skipping.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import CONVERSATIONS_DIR, need, require_shared

import chatmask
import chatmask.datasets
from chatmask._core import DEMO_EOS_TOKEN
from chatmask.demo import demo_chat_template, demo_conversations, demo_tokenizer, demo_tokenizer_json
from chatmask.ray_data import TokenizeBatch

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TOK = demo_tokenizer()
ROWS = demo_conversations()
# The demo row the reference fails on in mode "all" (it opens with an assistant turn).
EMPTY = TOK.tokenize_batch(ROWS, mode="all", on_error="skip").errors[0][0]

TOTALS = {"rows": 0, "values": 0}


@pytest.fixture(scope="module", autouse=True)
def report_totals(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and TOTALS["rows"]:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\nadapters vs tokenize_batch: {TOTALS['rows']} rows, {TOTALS['values']} token ids + labels "
                "compared element by element, 0 mismatches"
            )


def repeated(rows: list[dict], n: int) -> list[dict]:
    """`n` rows cycling through `rows`, each with a distinct id."""
    return [dict(rows[i % len(rows)], id=f"{rows[i % len(rows)]['id']}-{i}") for i in range(n)]


def columns(rows: list[dict]) -> dict[str, list[Any]]:
    """Rows as columns (Dataset.from_list would take its keys from the first row and drop `tools`)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def list_column(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, values) of an Arrow list column."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    array = array.cast(pa.list_(array.type.value_type)) if pa.types.is_large_list(array.type) else array
    offsets = array.offsets.to_numpy().astype(np.int64)
    values = array.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def check_against_batch(
    tok: chatmask.ChatTokenizer,
    rows: list[Any],
    ids: Any,
    labels: Any,
    errors: list[str] | None,
    mode: str,
    **kwargs: Any,
) -> int:
    """Adapter output (Arrow list columns, one row per input row) == tokenize_batch on `rows`.

    Every good row's ids and labels equal the batch API's, element by element (the flat values
    are equal and so is every row's length); every failing row is empty and carries the batch
    API's message (with errors=None, no row may fail). Returns the number of rows compared.
    """
    ref = tok.tokenize_batch(rows, mode=mode, on_error="skip", **kwargs)
    expected_errors = dict(ref.errors)
    if errors is None:
        assert not expected_errors
    else:
        assert len(errors) == len(rows)
        assert {i: e for i, e in enumerate(errors) if e} == expected_errors
    for column, flat, ref_offsets in ((ids, ref.input_ids, ref.offsets), (labels, ref.labels, ref.label_offsets)):
        offsets, values = list_column(column)
        assert len(offsets) == len(rows) + 1
        lengths = np.zeros(len(rows), dtype=np.int64)
        lengths[ref.rows] = np.diff(ref_offsets)
        np.testing.assert_array_equal(np.diff(offsets), lengths)
        np.testing.assert_array_equal(values, flat)
        assert values.dtype == flat.dtype
        TOTALS["values"] += len(values)
    TOTALS["rows"] += len(rows)
    return len(ref.rows)


# ---------------------------------------------------------------------------------------------
# pickling ChatTokenizer (what num_proc and Ray rely on)
# ---------------------------------------------------------------------------------------------


def tokenizer_dir(path: Path) -> Path:
    """A tokenizer directory for the demo tokenizer, with an extra named template."""
    path.mkdir()
    (path / "tokenizer.json").write_text(demo_tokenizer_json(), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": DEMO_EOS_TOKEN}), encoding="utf-8")
    (path / "chat_template.jinja").write_text(demo_chat_template(), encoding="utf-8")
    (path / "additional_chat_templates").mkdir()
    (path / "additional_chat_templates" / "plain.jinja").write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}", encoding="utf-8"
    )
    return path


def same_outputs(a: chatmask.ChatTokenizer, b: chatmask.ChatTokenizer, mode: str = "all") -> None:
    x, y = a.tokenize_batch(ROWS, mode=mode, on_error="skip"), b.tokenize_batch(ROWS, mode=mode, on_error="skip")
    np.testing.assert_array_equal(x.input_ids, y.input_ids)
    np.testing.assert_array_equal(x.labels, y.labels)
    np.testing.assert_array_equal(x.offsets, y.offsets)
    assert x.errors == y.errors


def test_pickle_from_parts_is_exact_and_deterministic():
    data = pickle.dumps(TOK)
    copy = pickle.loads(data)
    same_outputs(TOK, copy)
    assert copy.special_tokens == TOK.special_tokens and copy.eos_token_id == TOK.eos_token_id
    assert pickle.dumps(copy) == data == pickle.dumps(demo_tokenizer())


def test_pickle_from_pretrained_carries_the_files(tmp_path):
    path = tokenizer_dir(tmp_path / "tok")
    tok = chatmask.ChatTokenizer.from_pretrained(path)
    data = pickle.dumps(tok)
    shutil.rmtree(path)  # the copy must not need the directory (another machine does not have it)
    copy = pickle.loads(data)
    same_outputs(tok, copy)
    for t in (tok, copy):  # the named template came along
        assert t.apply_chat_template(ROWS[1]["messages"], tokenize=False, chat_template="plain").startswith("user: ")
    assert pickle.dumps(copy) == data


def test_pickle_keeps_render_limits_and_rejects_raw_cores():
    tok = demo_tokenizer()
    limits = getattr(chatmask, "RenderLimits", None)
    if limits is not None:
        tok.render_limits = limits(fuel=123_456, max_recursion=77, max_output_bytes=9_999_999)
        assert pickle.loads(pickle.dumps(tok)).render_limits == tok.render_limits
    raw = chatmask.ChatTokenizer(TOK._core)
    with pytest.raises(TypeError, match="raw core"):
        pickle.dumps(raw)


def test_pickle_keeps_the_jinja2_path():
    need("transformers")
    # A tuple without parentheses as a for-loop's iterable: minijinja cannot compile it, Jinja2 renders it.
    template = (
        "{% for m in messages %}{% set i = loop.index %}{% for p in 'turn_', '' %}{{ p }}{% endfor %}"
        "{{ i ~ ' ' }}{{ m.content }}\n{% endfor %}"
    )
    with pytest.warns(UserWarning, match="Jinja2"):
        tok = chatmask.ChatTokenizer.from_parts(
            demo_tokenizer_json(), template, {"eos_token": DEMO_EOS_TOKEN}, allow_jinja2=True
        )
    assert tok.render_backend == "jinja2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the copy does not warn again
        copy = pickle.loads(pickle.dumps(tok))
    assert copy.render_backend == "jinja2"
    chat = ROWS[1]["messages"]
    assert copy.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    assert copy.apply_chat_template(chat, tokenize=False).startswith("turn_1 ")


def test_pickle_from_transformers():
    need("transformers")
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(demo_tokenizer_json()), eos_token=DEMO_EOS_TOKEN
    )
    hf_tok.chat_template = demo_chat_template()
    tok = chatmask.ChatTokenizer.from_transformers(hf_tok)
    copy = pickle.loads(pickle.dumps(tok))
    same_outputs(tok, copy)
    same_outputs(TOK, copy)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets: core suite on the demo
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["last", "all"])
def test_datasets_map_equals_batch_api(hf, mode):
    rows = repeated(ROWS, 8 * 40)
    ds = hf.Dataset.from_dict(columns(rows))
    # Arrow gives every message every key: the adapter must drop the nulls.
    assert ds[0]["messages"][0]["tool_calls"] is None
    fn = chatmask.datasets.map_fn(TOK, mode=mode, on_error="mark")
    out = ds.map(fn, batched=True, batch_size=64, remove_columns=ds.column_names)
    assert out.column_names == ["input_ids", "labels", "error"]
    schema = out.data.schema
    assert schema.field("input_ids").type == pa.list_(pa.int32())
    assert schema.field("labels").type == pa.list_(pa.int64())
    assert schema.field("error").type == pa.string()
    table = out.data.table
    good = check_against_batch(TOK, rows, table.column("input_ids"), table.column("labels"), out["error"], mode)
    assert good == len(rows) - (40 if mode == "all" else 0)


def test_datasets_num_proc_and_fingerprint(hf):
    rows = repeated(ROWS, 8 * 30)
    ds = hf.Dataset.from_dict(columns(rows))
    fn = chatmask.datasets.map_fn(TOK, mode="all", on_error="mark")
    single = ds.map(fn, batched=True, batch_size=32, remove_columns=ds.column_names)
    multi = ds.map(fn, batched=True, batch_size=32, num_proc=2, remove_columns=ds.column_names)
    assert multi.data.table.equals(single.data.table)
    check_against_batch(
        TOK, rows, multi.data.table.column("input_ids"), multi.data.table.column("labels"), multi["error"], "all"
    )
    # A deterministic fingerprint (no "could not be hashed", random-hash fallback): an equal
    # function built separately gives the same fingerprint, a different mode another.
    from datasets.fingerprint import Hasher

    again = chatmask.datasets.map_fn(demo_tokenizer(), mode="all", on_error="mark")
    assert Hasher.hash(fn) == Hasher.hash(again) != Hasher.hash(chatmask.datasets.map_fn(TOK, mode="last"))
    twice = ds.map(again, batched=True, batch_size=32, remove_columns=ds.column_names)
    assert twice._fingerprint == single._fingerprint


def test_datasets_on_error_raise_names_the_row(hf):
    rows = repeated(ROWS, 24)
    ds = hf.Dataset.from_dict(columns(rows))
    fn = chatmask.datasets.map_fn(TOK, mode="all")
    with pytest.raises(chatmask.ConversationError) as info:
        ds.map(fn, batched=True, batch_size=5, with_indices=True)
    # Row EMPTY is the first failure; in batches of 5 it is row EMPTY % 5 of its batch.
    assert info.value.row == EMPTY and info.value.batch_row == EMPTY % 5
    assert str(info.value).startswith(f"dataset row {EMPTY} (row {EMPTY % 5} of the batch, id '{rows[EMPTY]['id']}'): ")
    assert "empty conversation" in str(info.value)
    with pytest.raises(chatmask.ConversationError) as info:
        ds.map(fn, batched=True, batch_size=5)
    assert info.value.row == info.value.batch_row == EMPTY % 5
    assert str(info.value).startswith(f"row {EMPTY % 5} of the batch, id '{rows[EMPTY]['id']}': ")
    # mode "last" has no failing row: no error column, same rows out.
    out = ds.map(chatmask.datasets.map_fn(TOK), batched=True, remove_columns=ds.column_names)
    assert out.column_names == ["input_ids", "labels"] and len(out) == len(rows)


def test_datasets_bad_rows_raise_or_are_marked(hf):
    rows = repeated(ROWS[:2], 6)
    cols = columns(rows)
    cols["messages"][1] = None  # a missing conversation
    cols["messages"][4] = []  # an empty one (the template/reference rejects it)
    ds = hf.Dataset.from_dict(cols)
    with pytest.raises(
        chatmask.ConversationTypeError,
        match=r"^dataset row 1 \(row 1 of the batch, id 'demo-1-1'\): field 'messages' is a null",
    ):
        ds.map(chatmask.datasets.map_fn(TOK), batched=True, with_indices=True)
    out = ds.map(
        chatmask.datasets.map_fn(TOK, on_error="mark"), batched=True, batch_size=4, remove_columns=ds.column_names
    )
    assert len(out) == len(rows)  # nothing dropped
    errors = out["error"]
    assert [i for i, e in enumerate(errors) if e] == [1, 4]
    assert "null" in errors[1] and errors[4]
    assert out[1]["input_ids"] == [] and out[1]["labels"] == [] and out[4]["input_ids"] == []
    good = [i for i in range(len(rows)) if i not in (1, 4)]
    ref = TOK.tokenize_batch([rows[i] for i in good], on_error="skip")
    for k, i in enumerate(good):
        assert out[i]["input_ids"] == ref[k]["input_ids"].tolist() and out[i]["labels"] == ref[k]["labels"].tolist()
    assert out.filter(lambda r: not r["error"]).num_rows == len(good)


def test_datasets_tools_as_json_strings_and_fields(hf):
    rows = ROWS[:4]
    ds = hf.Dataset.from_dict(
        {
            "conv": [r["messages"] for r in rows],
            "tool_json": [json.dumps(r["tools"]) if r.get("tools") else None for r in rows],
            "finish": ["length", None, "", "length"],
        }
    )
    fn = chatmask.datasets.map_fn(
        TOK, mode="all", messages_field="conv", tools_field="tool_json", finish_reason_field="finish"
    )
    out = ds.map(fn, batched=True, remove_columns=ds.column_names)
    check_against_batch(
        TOK,
        rows,
        out.data.table.column("input_ids"),
        out.data.table.column("labels"),
        None,
        "all",
        finish_reason=["length", "", "", "length"],
    )


def test_datasets_json_values_keep_their_nulls(hf):
    """A real null inside a JSON-typed value stays (it renders); struct nulls go."""
    import copy

    rows = [copy.deepcopy(ROWS[2]) for _ in range(3)]
    rows[0]["tools"][0]["function"]["parameters"]["required"] = None  # as in real tool schemas
    rows[1]["tools"][0]["function"]["strict"] = None
    cols = columns(rows)
    features = hf.Dataset.from_dict(cols).features.copy()
    features["tools"] = hf.List(hf.Json())
    ds = hf.Dataset.from_dict(cols, features=features)
    assert ds[0]["messages"][0]["tool_calls"] is None  # messages are structs: Arrow-made nulls
    assert ds[0]["tools"][0]["function"]["parameters"]["required"] is None  # tools are JSON: a real null
    fn = chatmask.datasets.map_fn(TOK, mode="all")
    out = ds.map(fn, batched=True, remove_columns=ds.column_names)
    check_against_batch(TOK, rows, out.data.table.column("input_ids"), out.data.table.column("labels"), None, "all")
    # The null matters to this template (tojson prints it): dropping it would change the tokens.
    stripped = fn({"messages": [r["messages"] for r in rows], "tools": [r["tools"] for r in rows]})
    assert stripped["input_ids"][0].tolist() != out[0]["input_ids"]
    assert stripped["input_ids"][2].tolist() == out[2]["input_ids"]


def test_map_fn_arguments():
    with pytest.raises(ValueError, match="mode"):
        chatmask.datasets.map_fn(TOK, mode="everything")
    with pytest.raises(ValueError, match="on_error"):
        chatmask.datasets.map_fn(TOK, on_error="skip")
    with pytest.raises(TypeError, match="tokenizer"):
        chatmask.datasets.map_fn(42)
    with pytest.raises(chatmask.TokenizerError):
        chatmask.datasets.map_fn("/no/such/tokenizer/dir")
    fn = chatmask.datasets.map_fn(TOK)
    with pytest.raises(TypeError, match="batched=True"):
        fn({"messages": ROWS[0]["messages"]})  # one example, not a batch
    with pytest.raises(KeyError, match="no column 'messages'"):
        fn({"conversation": [ROWS[0]["messages"]]})
    # A plain dict of lists works too, and an empty batch gives empty columns.
    out = fn({"messages": [ROWS[0]["messages"]]})
    assert out["input_ids"][0].tolist() == TOK.tokenize_batch([ROWS[0]])[0]["input_ids"].tolist()
    assert fn({"messages": []}) == {"input_ids": [], "labels": []}


# ---------------------------------------------------------------------------------------------
# Ray Data: TokenizeBatch called directly, then on a local cluster
# ---------------------------------------------------------------------------------------------


def arrow_table(rows: list[dict]) -> Any:
    """Rows to an Arrow table with the schema inferred from all rows."""
    return pa.Table.from_batches([pa.RecordBatch.from_struct_array(pa.array(rows))])


def test_tokenize_batch_on_arrow_and_mappings():
    rows = repeated(ROWS, 40)
    table = arrow_table(rows)
    out = TokenizeBatch(TOK, "all", on_error="mark")(table)
    assert out.column_names == ["id", "input_ids", "labels", "error"]
    assert out.column("id").to_pylist() == [r["id"] for r in rows]
    assert out.schema.field("input_ids").type == pa.list_(pa.int32())
    assert out.schema.field("labels").type == pa.list_(pa.int64())
    check_against_batch(
        TOK, rows, out.column("input_ids"), out.column("labels"), out.column("error").to_pylist(), "all"
    )

    kept = TokenizeBatch(TOK, keep_columns=["messages"])(table)
    assert kept.column_names == ["messages", "input_ids", "labels"]
    with pytest.raises(KeyError, match="keep_columns"):
        TokenizeBatch(TOK, keep_columns=["nope"])(table)
    with pytest.raises(chatmask.ConversationError, match=rf"^row {EMPTY} of the batch, id '{rows[EMPTY]['id']}': "):
        TokenizeBatch(TOK, "all")(table)

    mapping = TokenizeBatch(TOK, "last")(
        {"id": np.array([r["id"] for r in rows]), "messages": [r["messages"] for r in rows]}
    )
    assert list(mapping) == ["id", "input_ids", "labels"]
    ref = TOK.tokenize_batch([r["messages"] for r in rows])
    assert [x.tolist() for x in mapping["input_ids"]] == [x["tokens"] for x in ref.to_list()]
    with pytest.raises(TypeError, match="pyarrow"):
        TokenizeBatch(TOK)([1, 2, 3])


def test_tokenize_batch_reads_json_typed_columns(hf, tmp_path):
    """Parquet written by `datasets` with Json features holds JSON text (arrow.json): it is parsed,
    and its nulls are kept."""
    import copy

    rows = repeated(ROWS, 16)
    rows = [copy.deepcopy(r) for r in rows]
    rows[2]["tools"][0]["function"]["parameters"]["required"] = None
    cols = columns(rows)
    features = hf.Dataset.from_dict(cols).features.copy()
    features["messages"] = hf.List(hf.Json())
    features["tools"] = hf.List(hf.Json())
    hf.Dataset.from_dict(cols, features=features).to_parquet(str(tmp_path / "json.parquet"))
    table = pq.read_table(tmp_path / "json.parquet")
    assert table.schema.field("messages").type.value_type.extension_name == "arrow.json"
    out = TokenizeBatch(TOK, "all", on_error="mark")(table)
    check_against_batch(
        TOK, rows, out.column("input_ids"), out.column("labels"), out.column("error").to_pylist(), "all"
    )


def run_ray(ray: Any, src: Path, out: Path, tokenizer: Any, cls: type = TokenizeBatch, **kwargs: Any) -> Any:
    """The README's form: read Parquet, map_batches(cls), write Parquet; then read it back.

    The actors log their pid when built and at each batch (a file, since they are other
    processes): two actors, each built once, and every batch done by one of them.
    """
    log = out.parent / f"{out.name}.workers.log"

    class Logged(cls):  # type: ignore[valid-type,misc]
        """A local class, so Ray ships it by value (workers cannot import the test module)."""

        def __init__(self, *args: Any, log_path: str, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.log_path = log_path
            self._log("init", 0)

        def _log(self, what: str, rows: int) -> None:
            import os

            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(f"{what} {os.getpid()} {rows}\n")

        def __call__(self, batch: Any) -> Any:
            result = super().__call__(batch)
            self._log("call", result.num_rows)
            return result

    # A small input reads as one block: split it so that both actors can get some.
    ds = ray.data.read_parquet(str(src)).repartition(8)
    ds = ds.map_batches(
        Logged,
        fn_constructor_kwargs={"tokenizer": tokenizer, "log_path": str(log), **kwargs},
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=0.5,  # two actors plus the read and write tasks on a 2-CPU cluster
        batch_format="pyarrow",
        batch_size=1024,
    )
    ds.write_parquet(str(out))
    entries = [line.split() for line in log.read_text(encoding="utf-8").splitlines()]
    built = [pid for what, pid, _ in entries if what == "init"]
    assert len(built) == len(set(built)) == 2, entries  # one tokenizer per actor, two actors
    assert {pid for what, pid, _ in entries if what == "call"} <= set(built)
    table = pq.read_table(str(out))
    assert sum(int(n) for what, _, n in entries if what == "call") == table.num_rows
    return table


def write_parts(table: Any, path: Path, parts: int) -> Path:
    path.mkdir()
    step = -(-table.num_rows // parts)
    for k in range(parts):
        pq.write_table(table.slice(k * step, step), path / f"part-{k}.parquet")
    return path


def in_input_order(result: Any, rows: list[dict]) -> Any:
    """Ray does not keep row order across blocks: put the rows back in input order by id."""
    position = {r["id"]: i for i, r in enumerate(rows)}
    assert result.num_rows == len(rows)
    order = np.argsort([position[i] for i in result.column("id").to_pylist()])
    result = result.take(pa.array(order))
    assert result.column("id").to_pylist() == [r["id"] for r in rows]
    return result


RAY_OWN_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own deprecated settings


@RAY_OWN_WARNINGS
def test_ray_data_10k_rows_equal_batch_api(ray_cluster, tmp_path):
    rows = repeated(ROWS, 10_000)
    src = write_parts(arrow_table(rows), tmp_path / "in", 4)
    result = in_input_order(run_ray(ray_cluster, src, tmp_path / "out", TOK, mode="all", on_error="mark"), rows)
    assert result.column_names == ["id", "input_ids", "labels", "error"]
    good = check_against_batch(
        TOK, rows, result.column("input_ids"), result.column("labels"), result.column("error").to_pylist(), "all"
    )
    assert good == 10_000 - 10_000 // len(ROWS)


# ---------------------------------------------------------------------------------------------
# MaskPolicy through the adapters (demo)
# ---------------------------------------------------------------------------------------------


def check_policy_against_batch(
    tok: chatmask.ChatTokenizer, rows: list[Any], out: Any, policy: chatmask.MaskPolicy
) -> int:
    """Adapter output under a policy (an Arrow table, one row per input row) == tokenize_batch(rows,
    policy=policy): ids, labels and message_index element by element, span_method and truncated per
    row; failed and dropped rows empty, with the batch API's message / in ``dropped``. Returns the
    number of rows with tokens."""
    ref = tok.tokenize_batch(rows, policy=policy, on_error="skip")
    n = len(rows)
    assert out.num_rows == n
    lengths = np.zeros(n, dtype=np.int64)
    lengths[ref.rows] = np.diff(ref.offsets)
    for name, flat in (("input_ids", ref.input_ids), ("labels", ref.labels), ("message_index", ref.message_index)):
        offsets, values = list_column(out.column(name))
        np.testing.assert_array_equal(np.diff(offsets), lengths)
        np.testing.assert_array_equal(values, flat)
        assert values.dtype == flat.dtype, name
        if name != "message_index":
            TOTALS["values"] += len(values)
    assert out.schema.field("message_index").type == pa.list_(pa.int32())
    span = [""] * n
    truncated = [0] * n
    for k, i in enumerate(ref.rows.tolist()):
        span[i], truncated[i] = ref.span_methods[k], int(ref.truncated[k])
    assert out.column("span_method").to_pylist() == span
    assert out.column("truncated").to_pylist() == truncated
    if policy.overflow == "drop":
        assert [i for i, d in enumerate(out.column("dropped").to_pylist()) if d] == sorted(ref.dropped)
    else:
        assert "dropped" not in out.column_names
    if "error" in out.column_names:
        assert {i: e for i, e in enumerate(out.column("error").to_pylist()) if e} == {
            i: e.split(": ", 1)[1] if e.startswith("row ") else e for i, e in ref.errors
        }
    else:
        assert not ref.errors
    TOTALS["rows"] += n
    return len(ref.rows)


def drop_policy(**fields: Any) -> chatmask.MaskPolicy:
    """A policy whose max_length drops about half the demo rows."""
    lengths = sorted(len(TOK.tokenize(r, chatmask.MaskPolicy())["input_ids"]) for r in ROWS)
    return chatmask.MaskPolicy(max_length=lengths[len(lengths) // 2], overflow="drop", **fields)


def test_datasets_map_with_policy_equals_batch_api(hf):
    rows = repeated(ROWS, 8 * 25)
    policy = drop_policy(train_on_eos="all")
    ds = hf.Dataset.from_dict(columns(rows))
    fn = chatmask.datasets.map_fn(TOK, policy=policy, on_error="mark")
    out = ds.map(fn, batched=True, batch_size=48, remove_columns=ds.column_names)
    assert out.column_names == ["input_ids", "labels", "message_index", "span_method", "truncated", "dropped", "error"]
    schema = out.data.schema
    assert schema.field("span_method").type == pa.string() and schema.field("truncated").type == pa.int32()
    assert schema.field("dropped").type == pa.bool_()
    good = check_policy_against_batch(TOK, rows, out.data.table, policy)
    assert 0 < good < len(rows) and out.filter(lambda r: not r["dropped"]).num_rows == good
    # A policy without overflow="drop": no dropped column; on_error="raise" has no error column.
    plain = ds.map(
        chatmask.datasets.map_fn(TOK, policy=chatmask.MaskPolicy()), batched=True, remove_columns=ds.column_names
    )
    assert plain.column_names == ["input_ids", "labels", "message_index", "span_method", "truncated"]
    check_policy_against_batch(TOK, rows, plain.data.table, chatmask.MaskPolicy())

    # Fingerprint by content: an equal policy built separately hashes the same, another policy differently.
    from datasets.fingerprint import Hasher

    again = chatmask.datasets.map_fn(demo_tokenizer(), policy=drop_policy(train_on_eos="all"), on_error="mark")
    assert pickle.dumps(again) == pickle.dumps(fn)
    assert Hasher.hash(fn) == Hasher.hash(again)
    assert Hasher.hash(fn) != Hasher.hash(chatmask.datasets.map_fn(TOK, policy=drop_policy(), on_error="mark"))
    assert Hasher.hash(fn) != Hasher.hash(chatmask.datasets.map_fn(TOK, on_error="mark"))
    twice = ds.map(again, batched=True, batch_size=48, remove_columns=ds.column_names)
    assert twice._fingerprint == out._fingerprint


def test_datasets_first_batch_without_tokens(hf):
    """A first batch whose rows are all dropped (no tokens, so no span method) must not type
    span_method null: `datasets` would refuse every later batch's strings."""
    policy = drop_policy()
    lengths = [len(TOK.tokenize(r, chatmask.MaskPolicy())["input_ids"]) for r in ROWS]
    long_first = [ROWS[i] for i in sorted(range(len(ROWS)), key=lambda i: -lengths[i])]
    rows = repeated(long_first[:2], 4) + repeated(ROWS, 16)
    assert all(TOK.tokenize(r, policy) is None for r in rows[:4])
    ds = hf.Dataset.from_dict(columns(rows))
    out = ds.map(chatmask.datasets.map_fn(TOK, policy=policy), batched=True, batch_size=4)
    assert out.data.schema.field("span_method").type == pa.string()
    assert out["span_method"][:4] == [""] * 4 and "one_render" in out["span_method"]
    check_policy_against_batch(TOK, rows, out.data.table, policy)


def test_datasets_policy_sharegpt_and_errors(hf):
    names = {"user": "human", "assistant": "gpt"}
    rows = [
        {
            "id": r["id"],
            "conversations": [
                {"from": names.get(m["role"], m["role"]), "value": m["content"]}
                for m in r["messages"]
                if m["role"] in names and isinstance(m.get("content"), str)
            ],
            "sys": "Be brief.",
        }
        for r in ROWS
    ]
    policy = chatmask.MaskPolicy(field_messages="conversations", field_system="sys", train_on_eos="last")
    ds = hf.Dataset.from_dict(columns(rows))
    out = ds.map(
        chatmask.datasets.map_fn(TOK, policy=policy), batched=True, batch_size=3, remove_columns=ds.column_names
    )
    check_policy_against_batch(TOK, rows, out.data.table, policy)
    assert out[0]["message_index"][0] == -1 and 0 in out[0]["message_index"]  # the system prompt is message 0
    # A bad message (Arrow cannot hold one, so a plain batch as a with_indices map passes it): named
    # by its dataset row under "raise", marked with the shaping message under "mark".
    bad = columns(rows[4:8])
    bad["conversations"][1] = [{"from": "human", "value": "hi"}, "not a message"]
    with pytest.raises(chatmask.ConversationTypeError) as info:
        chatmask.datasets.map_fn(TOK, policy=policy)(bad, [4, 5, 6, 7])
    assert info.value.row == 5 and info.value.batch_row == 1
    assert str(info.value) == "dataset row 5 (row 1 of the batch, id 'demo-5'): message 1 is a str, not a dict"
    marked = chatmask.datasets.map_fn(TOK, policy=policy, on_error="mark")(bad, [4, 5, 6, 7])
    assert marked["error"] == ["", "message 1 is a str, not a dict", "", ""]
    assert len(marked["input_ids"][1]) == len(marked["message_index"][1]) == 0 and marked["span_method"][1] == ""
    with pytest.raises(ValueError, match="cannot be combined with policy"):
        chatmask.datasets.map_fn(TOK, "all", policy=policy)
    with pytest.raises(ValueError, match="messages_field"):
        chatmask.datasets.map_fn(TOK, messages_field="conversations", policy=policy)


def test_tokenize_batch_with_policy_on_arrow_and_mappings():
    rows = repeated(ROWS, 40)
    policy = drop_policy()
    table = arrow_table(rows)
    out = TokenizeBatch(TOK, policy=policy, on_error="mark")(table)
    assert out.column_names == [
        "id",
        "input_ids",
        "labels",
        "message_index",
        "span_method",
        "truncated",
        "dropped",
        "error",
    ]
    check_policy_against_batch(TOK, rows, out, policy)
    mapping = TokenizeBatch(TOK, policy=policy)(
        {"id": np.array([r["id"] for r in rows]), "messages": [r["messages"] for r in rows]}
    )
    assert list(mapping) == ["id", "input_ids", "labels", "message_index", "span_method", "truncated", "dropped"]
    ref = TOK.tokenize_batch([r["messages"] for r in rows], policy=policy)
    kept = [i for i, d in enumerate(mapping["dropped"]) if not d]
    assert kept == ref.rows.tolist()
    for k, i in enumerate(kept):
        assert mapping["message_index"][i].tolist() == ref[k]["message_index"].tolist()
        assert mapping["input_ids"][i].tolist() == ref[k]["input_ids"].tolist()


@RAY_OWN_WARNINGS
def test_ray_data_with_policy(ray_cluster, tmp_path):
    rows = repeated(ROWS, 2_000)
    policy = drop_policy(train_on_eos="all")
    src = write_parts(arrow_table(rows), tmp_path / "in", 2)
    result = in_input_order(run_ray(ray_cluster, src, tmp_path / "out", TOK, policy=policy, on_error="mark"), rows)
    assert result.column_names == [
        "id",
        "input_ids",
        "labels",
        "message_index",
        "span_method",
        "truncated",
        "dropped",
        "error",
    ]
    good = check_policy_against_batch(TOK, rows, result, policy)
    assert 0 < good < len(rows)


# ---------------------------------------------------------------------------------------------
# ../shared fixtures: real conversations and tokenizers
# ---------------------------------------------------------------------------------------------


def fixture_rows(name: str) -> list[dict]:
    path = require_shared("fixtures", "conversations", name)
    # Split on "\n" only: the text holds U+2028 and friends, which str.splitlines would split on.
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").split("\n") if line.strip()]


FIXTURE_FILES = sorted(p.name for p in CONVERSATIONS_DIR.glob("*.jsonl")) or ["alpaca_single_turn.jsonl"]


@pytest.fixture(scope="module")
def qwen3():
    return chatmask.ChatTokenizer.from_pretrained(require_shared("fixtures", "tokenizers", "qwen3"))


@pytest.mark.parametrize("name", FIXTURE_FILES)
def test_datasets_fixture_files(hf, qwen3, tmp_path, name):
    """load_dataset("json") on each fixture file: every row equals tokenize_batch on the JSONL row."""
    rows = fixture_rows(name)
    ds = hf.load_dataset("json", data_files=str(CONVERSATIONS_DIR / name), split="train", cache_dir=str(tmp_path))
    out = ds.map(
        chatmask.datasets.map_fn(qwen3, on_error="mark"),
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
    )
    table = out.data.table
    good = check_against_batch(qwen3, rows, table.column("input_ids"), table.column("labels"), out["error"], "last")
    assert good == len(rows) - sum(1 for e in out["error"] if e)


def test_datasets_fixture_tools_num_proc_from_a_path(hf, tmp_path):
    """A tokenizer given as a directory, tool-calling rows, mode all, two processes."""
    path = require_shared("fixtures", "tokenizers", "llama3")
    tok = chatmask.ChatTokenizer.from_pretrained(path)
    kwargs = {"date_string": "26 Jul 2024"}
    fn = chatmask.datasets.map_fn(str(path), mode="all", on_error="mark", num_threads=1, **kwargs)
    # (One file at a time: load_dataset infers different features for the two, so they do not concatenate.)
    for name in ("glaive_toolcall_en.jsonl", "reasoning_tool_use.jsonl"):
        rows = fixture_rows(name)
        ds = hf.load_dataset("json", data_files=str(CONVERSATIONS_DIR / name), split="train", cache_dir=str(tmp_path))
        out = ds.map(fn, batched=True, batch_size=64, num_proc=2, remove_columns=ds.column_names)
        table = out.data.table
        check_against_batch(tok, rows, table.column("input_ids"), table.column("labels"), out["error"], "all", **kwargs)


@RAY_OWN_WARNINGS
def test_ray_data_fixture_rows_from_a_path(ray_cluster, tmp_path):
    """Real conversations (English, Chinese, multilingual), the tokenizer loaded by path on each worker."""
    path = require_shared("fixtures", "tokenizers", "qwen3")
    rows = fixture_rows("alpaca_single_turn.jsonl") + fixture_rows("sharegpt_multilingual.jsonl")
    src = write_parts(arrow_table(rows), tmp_path / "in", 3)
    result = in_input_order(run_ray(ray_cluster, src, tmp_path / "out", str(path), mode="last"), rows)
    assert result.column_names == ["id", "input_ids", "labels"]
    tok = chatmask.ChatTokenizer.from_pretrained(path)
    check_against_batch(tok, rows, result.column("input_ids"), result.column("labels"), None, "last")
