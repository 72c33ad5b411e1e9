"""``chatmask tokenize --pack``: packed parts equal the unpacked run row by row, crash-safe resume
with open windows, the manifest's pack counts, the resume fingerprint, usage errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from chatmask.cli import main  # noqa: E402
from chatmask.demo import demo_conversations  # noqa: E402
from chatmask.io import sinks  # noqa: E402
from chatmask.pipeline import job as pipeline_job  # noqa: E402

ROWS: list[Any] = [r for r in demo_conversations() * 12 for r in (r, "{broken")][:150]  # every other row bad JSON


class Crash(BaseException):
    """Stands in for a SIGKILL at a chosen point of the commit protocol."""


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def run(*args: str) -> int:
    return main(["tokenize", *args, "--tokenizer", "demo", "--quiet"])


def parts(out: Path, manifest: dict | None = None) -> list[Any]:
    manifest = manifest or json.loads((out / "manifest.json").read_text())
    return [pq.read_table(out / p["file"]) for p in manifest["parts"]]


def unpacked_rows(out: Path) -> dict[int, tuple[list[int], list[int], list[int]]]:
    table = pa.concat_tables(parts(out))
    cols = [table.column(c).to_pylist() for c in ("row", "input_ids", "labels", "message_index")]
    return {r: (ids, labels, mi) for r, ids, labels, mi in zip(*cols)}


def check_packed(out: Path, clean: Path, max_length: int, pad: bool) -> int:
    """Every row of the unpacked run found exactly once, in order, in the packs; returns values compared."""
    want = unpacked_rows(clean)
    seen: dict[int, list[tuple[list, list, list]]] = {}
    compared = 0
    manifest = json.loads((out / "manifest.json").read_text())
    for table in parts(out, manifest):
        for pack in table.to_pylist():
            n = len(pack["input_ids"])
            assert n <= max_length and sum(pack["seq_lens"]) == n and (n == max_length or not pad)
            at = 0
            for length, row in zip(pack["seq_lens"], pack["rows"]):
                piece = [pack[c][at : at + length] for c in ("input_ids", "labels", "position_ids", "message_index")]
                at += length
                if row < 0:
                    assert pad and set(piece[1]) == {-100} and set(piece[3]) == {-1}
                    continue
                assert piece[2] == list(range(length)) and piece[1][0] == -100
                seen.setdefault(row, []).append((piece[0], piece[1], piece[3]))
    assert sorted(seen) == sorted(want)
    for row, (ids, labels, mi) in want.items():
        got_ids = [t for p in seen[row] for t in p[0]]
        got_mi = [t for p in seen[row] for t in p[2]]
        starts = np.cumsum([0] + [len(p[0]) for p in seen[row]])[:-1]
        want_labels = list(labels)
        for s in starts:
            want_labels[s] = -100
        assert got_ids == ids and got_mi == mi and [t for p in seen[row] for t in p[1]] == want_labels, row
        compared += 3 * len(ids)
    clean_manifest = json.loads((clean / "manifest.json").read_text())
    for key in ("rows_in", "rows_out", "rows_failed", "tokens"):
        assert manifest[key] == clean_manifest[key], key
    return compared


@pytest.mark.parametrize("strategy", ["bfd", "ffd", "sequential"])
@pytest.mark.parametrize("pad", [False, True])
def test_packed_parts_hold_every_row_of_the_unpacked_run(tmp_path, strategy, pad):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    clean, out = tmp_path / "clean", tmp_path / "out"
    assert run(str(src), "-o", str(clean)) == 0
    extra = ["--pad"] if pad else []
    args = [str(src), "-o", str(out), "--pack", "96", "--pack-strategy", strategy, "--pack-window", "40", *extra]
    assert run(*args, "--batch-rows", "16") == 0
    assert check_packed(out, clean, 96, pad) > 0
    m = json.loads((out / "manifest.json").read_text())["pack"]
    tables = parts(out)
    packs = sum(t.num_rows for t in tables)
    tokens = sum(
        sum(s for s, r in zip(ls, rs) if r >= 0)
        for t in tables
        for ls, rs in zip(t.column("seq_lens").to_pylist(), t.column("rows").to_pylist())
    )
    assert m["packs"] == packs and m["tokens"] == tokens and m["capacity"] == packs * 96
    assert m["efficiency"] == round(tokens / (packs * 96), 6)
    assert m["rows_split"] > 0  # the demo's longest rows exceed 96 tokens: split is exercised
    assert len(tables) == 4  # 150 input rows in windows of >= 40 (batches of 16): 48 + 48 + 48 + 6


def _committed_rows(out: Path) -> set[int]:
    """Rows before the commit point that the committed parts and side-file bytes hold."""
    progress = json.loads((out / "progress.json").read_text())
    rows: set[int] = set()
    for p in progress["parts"]:
        for lst in pq.read_table(out / p["file"]).column("rows").to_pylist():
            rows |= {r for r in lst if r >= 0}
    with open(out / "errors.jsonl", "rb") as f:
        data = f.read()[: progress["errors_bytes"]]
    rows |= {json.loads(line)["row"] for line in data.splitlines()}
    return rows


@pytest.mark.parametrize("where", ["commit-start", "part-rename", "progress"])
def test_resume_after_crash_with_an_open_window(tmp_path, monkeypatch, where):
    """Crash at each step of the second window's commit: the commit point never passes a row that
    is not in a committed part or errors.jsonl, and the resumed output equals a clean packed run."""
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out, clean = tmp_path / "out", tmp_path / "clean"
    args = [str(src), "-o", str(out), "--pack", "128", "--pack-window", "40", "--batch-rows", "16"]
    calls = {"n": 0}
    if where == "commit-start":  # the window packed and written to its .tmp, nothing committed
        real_commit = pipeline_job.Job._commit

        def commit(self, next_row):
            calls["n"] += 1
            if calls["n"] == 2:
                raise Crash
            return real_commit(self, next_row)

        monkeypatch.setattr(pipeline_job.Job, "_commit", commit)
    elif where == "part-rename":
        real_replace = os.replace

        def replace(a, b):
            if str(a).endswith(".parquet.tmp"):
                calls["n"] += 1
                if calls["n"] == 2:
                    raise Crash
            return real_replace(a, b)

        monkeypatch.setattr(os, "replace", replace)
    else:  # part renamed, progress.json not replaced (call 1 is the initial progress.json)
        real_write = sinks.write_json_atomic

        def write(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Crash
            return real_write(*a, **k)

        monkeypatch.setattr(sinks, "write_json_atomic", write)
    with pytest.raises(Crash):
        run(*args)
    monkeypatch.undo()
    progress = json.loads((out / "progress.json").read_text())
    assert 0 < progress["next_row"] < len(ROWS)
    assert _committed_rows(out) == set(range(progress["next_row"]))
    assert run(*args) == 2  # needs --resume
    assert run(*args[:3], "--pack", "64", *args[5:], "--resume") == 2  # other pack options: refused
    assert run(*args, "--resume") == 0
    assert run(*args[:2], str(clean), *args[3:]) == 0
    got, want = pa.concat_tables(parts(out)), pa.concat_tables(parts(clean))
    assert got.equals(want)
    assert (out / "errors.jsonl").read_bytes() == (clean / "errors.jsonl").read_bytes()
    m_got, m_want = (json.loads((d / "manifest.json").read_text()) for d in (out, clean))
    assert m_got["pack"] == m_want["pack"] and m_got["rows_out"] == m_want["rows_out"]


def test_pack_options_need_pack(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS[:4])
    assert run(str(src), "-o", str(tmp_path / "out"), "--pad") == 2
    err = capsys.readouterr().err
    assert "--pad needs --pack MAX_LEN" in err and len(err.strip().splitlines()) == 1


def test_reference_mode_packs(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out"
    assert run(str(src), "-o", str(out), "--mode", "last", "--pack", "512") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["rows_in"] == m["rows_out"] + m["rows_failed"] + m["rows_dropped"]
    assert m["pack"]["packs"] > 0
