"""The corpus pipeline's rooms and the defects of issue 14, each with a test that fails on the
single-module pipeline it replaced:

* the layout: no module over ~500 lines, and importing the adapters does not load the CLI;
* ``--resume`` refuses a changed tokenizer file (any file the loader reads), another chatmask
  version;
* the CLI (JSONL and Parquet), both adapters and ``show`` read a row identically (one null rule:
  a ``tools`` JSON string keeps ``"default": null``);
* a truncated or corrupt ``.gz`` / ``.zst``, a Parquet file with a broken footer or an unreadable
  file ends with one line, exit 2, everything before it committed, and ``--resume`` continues
  once the file is fixed.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from test_cli import (  # noqa: E402
    Crash,
    check_output,
    conv,
    crash_at_commit,
    expected_convs,
    read_parts,
    write_jsonl,
    write_parquet,
)

import chatmask  # noqa: E402
from chatmask.cli import main  # noqa: E402
from chatmask.demo import demo_chat_template, demo_conversations, demo_tokenizer, demo_tokenizer_json  # noqa: E402
from chatmask.io import readers  # noqa: E402

TOK = demo_tokenizer()
ROWS = demo_conversations()
PACKAGE = Path(chatmask.__file__).parent


# ---------------------------------------------------------------------------------------------
# Layout


def test_no_module_over_500_lines():
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert len(sizes) > 20, sizes  # the rooms exist
    big = {name: n for name, n in sizes.items() if n > 500}
    assert not big, f"modules over ~500 lines: {big}"


def test_adapters_do_not_import_the_cli():
    code = (
        "import sys, chatmask.datasets, chatmask.ray_data, chatmask._adapter; "
        "print(sorted(m for m in sys.modules if m.startswith(('chatmask.cli', 'chatmask.pipeline', 'chatmask.show'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_show_css_is_package_data():
    from chatmask.show.html import stylesheet

    assert (PACKAGE / "show" / "show.css").is_file()
    assert ".trained" in stylesheet() and ".masked" in stylesheet()


def test_options_declared_once_reach_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["tokenize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    # defaults come from the dataclass fields, not restated in argparse
    assert "(default: 4096)" in text and "(default: 100000)" in text and "(default: messages)" in text
    assert "MaskPolicy(): assistant turns and their end tokens" in text


# ---------------------------------------------------------------------------------------------
# (a) the resume fingerprint


def demo_dir(path: Path) -> Path:
    path.mkdir()
    (path / "tokenizer.json").write_text(demo_tokenizer_json(), encoding="utf-8")
    (path / "chat_template.jinja").write_text(demo_chat_template(), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}), encoding="utf-8")
    return path


def interrupted_job(tmp_path: Path, monkeypatch, tokenizer: Path) -> list[str]:
    """An interrupted `chatmask tokenize` (killed at its second commit); returns its arguments."""
    src = write_jsonl(tmp_path / "in.jsonl", ROWS * 3)
    args = [
        "tokenize",
        str(src),
        "-o",
        str(tmp_path / "out"),
        "--tokenizer",
        str(tokenizer),
        "--mode",
        "last",
        "--quiet",
        "--rows-per-file",
        "4",
        "--batch-rows",
        "4",
    ]
    crash_at_commit(monkeypatch, 2)
    with pytest.raises(Crash):
        main(args)
    monkeypatch.undo()
    assert (tmp_path / "out" / "progress.json").exists()
    return args


@pytest.mark.parametrize(
    "change",
    [
        "chat_template.jinja",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "additional_chat_templates/tool_use.jinja",
    ],
)
def test_resume_refuses_a_changed_tokenizer_file(tmp_path, monkeypatch, capsys, change):
    tokenizer = demo_dir(tmp_path / "tok")
    args = interrupted_job(tmp_path, monkeypatch, tokenizer)
    target = tokenizer / change
    target.parent.mkdir(exist_ok=True)
    if change == "chat_template.jinja":
        target.write_text(demo_chat_template().replace("<|im_start|>assistant\\n", "<|im_start|>assistant \\n"))
    elif change == "tokenizer_config.json":
        target.write_text(json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>"}))
    elif change == "special_tokens_map.json":
        target.write_text(json.dumps({"pad_token": "<|im_end|>"}))
    else:
        target.write_text("{{ 'tools' }}")
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "different tokenizer" in err and "Traceback" not in err
    # Put it back: the job finishes, equal to a clean run.
    if change == "additional_chat_templates/tool_use.jinja":
        shutil.rmtree(target.parent)
    elif change in ("special_tokens_map.json",):
        target.unlink()
    elif change == "chat_template.jinja":
        target.write_text(demo_chat_template())
    else:
        target.write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert main(args + ["--resume"]) == 0
    check_output(tmp_path / "out", expected_convs(ROWS * 3))


def test_resume_refuses_another_chatmask_version(tmp_path, monkeypatch, capsys):
    args = interrupted_job(tmp_path, monkeypatch, demo_dir(tmp_path / "tok"))
    monkeypatch.setattr(chatmask, "__version__", chatmask.__version__ + ".dev1")
    assert main(args + ["--resume"]) == 2
    assert "different chatmask_version" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["tokenizer_files"]) == {"tokenizer.json", "chat_template.jinja", "tokenizer_config.json"}


def test_fingerprint_records_template_and_encoder_slot(tmp_path, monkeypatch):
    interrupted_job(tmp_path, monkeypatch, demo_dir(tmp_path / "tok"))
    config = json.loads((tmp_path / "out" / "progress.json").read_text())["config"]
    assert config["chatmask_version"] == chatmask.__version__
    assert config["tokenizer"]["render_backend"] == "minijinja"
    assert len(config["tokenizer"]["template_sha256"]) == 64
    assert "encoder" in config["tokenizer"]  # the slot the encoder option fills
    assert config["mode"] == "last" and config["messages_field"] == "messages" and config["policy"] is None


# ---------------------------------------------------------------------------------------------
# (b) one row reader


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"unit": {"type": "string", "default": None}}},
        },
    }
]
CHATS = [
    [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"unit": "c"}}}],
        },
        {"role": "tool", "content": "21 C"},
        {"role": "assistant", "content": "It is 21 C."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]


def _stored_rows() -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "messages": chat, "tools": json.dumps(TOOLS)} for i, chat in enumerate(CHATS)]


def test_cli_adapters_and_show_read_a_row_identically(tmp_path, capsys):
    rows = _stored_rows()
    parquet = write_parquet(tmp_path / "in.parquet", rows)
    jsonl = write_jsonl(tmp_path / "in.jsonl", rows)
    # Arrow gave the user turns `tool_calls: None`: the stored Parquet rows really have the nulls.
    assert pq.read_table(parquet).column("messages")[0].as_py()[0]["tool_calls"] is None
    want = TOK.tokenize_batch([{"messages": chat, "tools": TOOLS} for chat in CHATS], mode="all")
    text = TOK._core.decode(want[0]["input_ids"].tolist())
    assert '"default": null' in text  # the tool schema's null is part of the render

    got: dict[str, list[list[int]]] = {}
    for name, src in (("cli-parquet", parquet), ("cli-jsonl", jsonl)):
        out = tmp_path / name
        assert main(["tokenize", str(src), "-o", str(out), "--tokenizer", "demo", "--mode", "all", "--quiet"]) == 0
        got[name] = read_parts(out).column("input_ids").to_pylist()

    from chatmask.ray_data import TokenizeBatch

    got["ray"] = TokenizeBatch(TOK, "all")(pq.read_table(parquet)).column("input_ids").to_pylist()
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_parquet(str(parquet))
    mapped = ds.map(chatmask.datasets.map_fn(TOK, mode="all"), batched=True, remove_columns=ds.column_names)
    got["datasets"] = [list(r) for r in mapped["input_ids"]]
    # The adapters without Arrow types (plain dicts, as after json.loads of the stored row).
    from chatmask._adapter import RowTokenizer

    plain = RowTokenizer(TOK, "all").tokenize(
        {"messages": [r["messages"] for r in rows], "tools": [r["tools"] for r in rows]}
    )
    got["adapter-untyped"] = [a.tolist() for a in plain.id_rows()]

    expected = [want[i]["input_ids"].tolist() for i in range(len(CHATS))]
    for name, ids in got.items():
        assert ids == expected, name

    for src in (parquet, jsonl):
        for row in range(len(CHATS)):
            capsys.readouterr()
            assert (
                main(["show", str(src), "--row", str(row), "--tokenizer", "demo", "--mode", "all", "--no-color"]) == 0
            )
            header = capsys.readouterr().out.splitlines()[0]
            assert f": {len(expected[row])} tokens," in header, (src.name, header)


# ---------------------------------------------------------------------------------------------
# (c) broken input: one line, exit 2, committed prefix, resume after the fix


def _gzip_bytes(rows: list[Any]) -> bytes:
    return gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows))


def _run_broken(tmp_path: Path, capsys, inputs: list[Path], out: Path) -> tuple[str, dict]:
    capsys.readouterr()
    code = main(
        [
            "tokenize",
            *map(str, inputs),
            "-o",
            str(out),
            "--tokenizer",
            "demo",
            "--mode",
            "last",
            "--quiet",
            "--batch-rows",
            "16",
            "--rows-per-file",
            "50",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False and (out / "progress.json").exists()
    # Everything read before the failure is committed, in exactly one place.
    progress = json.loads((out / "progress.json").read_text())
    assert progress["next_row"] == manifest["rows_in"] == manifest["read_error"]["row"]
    table = read_parts(out)
    rows_out = table.num_rows if table is not None else 0
    assert rows_out + manifest["rows_failed"] == manifest["rows_in"]
    return err, manifest


def test_truncated_gzip_commits_what_was_read_and_resumes(tmp_path, capsys):
    rows = ROWS * 40
    good = _gzip_bytes(rows)
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(good[: len(good) * 2 // 3])
    out = tmp_path / "out"
    err, manifest = _run_broken(tmp_path, capsys, [src], out)
    assert str(src) in err and "truncated gzip" in err and "row(s)" in err and "--resume" in err
    assert 0 < manifest["rows_in"] < len(rows)
    assert (
        main(["tokenize", str(src), "-o", str(out), "--tokenizer", "demo", "--mode", "last", "--quiet", "--resume"])
        == 2
    )
    src.write_bytes(good)  # fixed
    assert (
        main(["tokenize", str(src), "-o", str(out), "--tokenizer", "demo", "--mode", "last", "--quiet", "--resume"])
        == 0
    )
    check_output(out, expected_convs(rows))
    assert json.loads((out / "manifest.json").read_text())["read_error"] is None


def test_corrupt_gzip_after_a_good_file(tmp_path, capsys):
    first = write_jsonl(tmp_path / "a.jsonl", ROWS)
    good = _gzip_bytes(ROWS * 40)
    bad = bytearray(good)
    for i in range(len(bad) // 2, len(bad) // 2 + 64):
        bad[i] ^= 0x5A
    second = tmp_path / "b.jsonl.gz"
    second.write_bytes(bytes(bad))
    out = tmp_path / "out"
    err, manifest = _run_broken(tmp_path, capsys, [first, second], out)
    assert str(second) in err and "gzip" in err
    assert manifest["rows_in"] >= len(ROWS) and manifest["read_error"]["input_index"] == 1
    second.write_bytes(good)
    assert (
        main(
            [
                "tokenize",
                str(first),
                str(second),
                "-o",
                str(out),
                "--tokenizer",
                "demo",
                "--mode",
                "last",
                "--quiet",
                "--resume",
            ]
        )
        == 0
    )
    check_output(out, expected_convs(ROWS + ROWS * 40))


def test_changed_file_before_the_broken_one_is_refused(tmp_path, capsys):
    first = write_jsonl(tmp_path / "a.jsonl", ROWS)
    second = tmp_path / "b.jsonl.gz"
    good = _gzip_bytes(ROWS * 5)
    second.write_bytes(good[:-30])
    out = tmp_path / "out"
    _run_broken(tmp_path, capsys, [first, second], out)
    write_jsonl(first, ROWS + ROWS[:1])
    second.write_bytes(good)
    assert (
        main(["tokenize", str(first), str(second), "-o", str(out), "--tokenizer", "demo", "--mode", "last", "--resume"])
        == 2
    )
    assert "different input sizes" in capsys.readouterr().err


def test_truncated_zstd(tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    rows = ROWS * 40
    data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    good = zstandard.ZstdCompressor().compress(data)
    src = tmp_path / "in.jsonl.zst"
    src.write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    err, manifest = _run_broken(tmp_path, capsys, [src], out)
    assert str(src) in err and "truncated zstd" in err
    assert manifest["rows_in"] < len(rows)
    src.write_bytes(good)
    assert (
        main(["tokenize", str(src), "-o", str(out), "--tokenizer", "demo", "--mode", "last", "--quiet", "--resume"])
        == 0
    )
    check_output(out, expected_convs(rows))


def test_parquet_with_a_broken_footer(tmp_path, capsys):
    first = write_jsonl(tmp_path / "a.jsonl", ROWS)
    second = write_parquet(tmp_path / "b.parquet", ROWS)
    good = second.read_bytes()
    second.write_bytes(good[:-10])
    out = tmp_path / "out"
    err, manifest = _run_broken(tmp_path, capsys, [first, second], out)
    assert str(second) in err and "Parquet" in err and "after 0 row(s)" in err
    assert manifest["rows_in"] == len(ROWS)  # the first file, all of it
    second.write_bytes(good)
    assert (
        main(
            [
                "tokenize",
                str(first),
                str(second),
                "-o",
                str(out),
                "--tokenizer",
                "demo",
                "--mode",
                "last",
                "--quiet",
                "--resume",
            ]
        )
        == 0
    )
    check_output(out, expected_convs(ROWS) + [conv(r) for r in ROWS])


def test_unreadable_file(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    real_open = open

    def fake_open(path, *a, **k):
        if str(path) == str(src):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(readers, "open", fake_open, raising=False)
    out = tmp_path / "out"
    err, manifest = _run_broken(tmp_path, capsys, [src], out)
    assert str(src) in err and "Permission denied" in err and manifest["rows_in"] == 0
    monkeypatch.undo()
    assert (
        main(["tokenize", str(src), "-o", str(out), "--tokenizer", "demo", "--mode", "last", "--quiet", "--resume"])
        == 0
    )
    check_output(out, expected_convs(ROWS))


def test_show_on_a_broken_file_is_one_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(_gzip_bytes(ROWS * 5)[:-30])
    assert main(["show", str(src), "--row", "40", "--tokenizer", "demo"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(src) in err and len(err.strip().splitlines()) == 1


def test_cli_traceback_free_in_a_subprocess(tmp_path):
    """The real entry point (not main() in-process): a truncated .gz prints one line, exit 2."""
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(_gzip_bytes(ROWS * 5)[:-30])
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "chatmask",
            "tokenize",
            str(src),
            "-o",
            str(tmp_path / "out"),
            "--tokenizer",
            "demo",
            "--mode",
            "last",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "truncated gzip" in proc.stderr


# --- the row-by-row fallback keeps every per-token field --------------------------------------


def test_the_row_by_row_fallback_equals_the_batch_call_field_by_field():
    from chatmask.pipeline.stages import merge_batches

    tok = demo_tokenizer()
    rows = [{"messages": c["messages"]} for c in demo_conversations()[:4]]
    policy = chatmask.MaskPolicy()
    whole = tok.tokenize_batch(rows, policy=policy)
    merged = merge_batches([tok.tokenize_batch([r], policy=policy) for r in rows], list(range(len(rows))), True)
    compared = 0
    for name in ("input_ids", "labels", "offsets", "message_index", "straddles_start", "truncated", "straddling"):
        want, got = getattr(whole, name), getattr(merged, name)
        assert got is not None, f"the fallback drops {name}"
        assert np.array_equal(np.asarray(got), np.asarray(want)), name
        compared += len(np.asarray(want))
    assert merged.span_methods == whole.span_methods
    assert compared > 0
