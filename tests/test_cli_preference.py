"""``chatmask tokenize --task preference``: the Parquet columns equal ``tokenize_preference_batch``
element by element (JSONL and Parquet inputs), bad rows go to errors.jsonl with the reason, the
manifest counts flagged pairs, SFT-only options are usage errors, and ``--resume`` refuses
another task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from test_cli import Crash, crash_at_commit, read_errors, read_parts, write_jsonl, write_parquet  # noqa: E402

from chatmask.cli import main  # noqa: E402
from chatmask.demo import demo_tokenizer  # noqa: E402
from chatmask.pipeline import job as pipeline_job  # noqa: E402

USER = {"role": "user", "content": "Name a colour."}
GOOD = [
    {"id": "explicit", "prompt": [USER], "chosen": "Blue.", "rejected": "Seven."},
    {
        "id": "implicit",
        "chosen": [USER, {"role": "assistant", "content": "Red, like a fire engine."}],
        "rejected": [USER, {"role": "assistant", "content": "I would rather not."}],
    },
    {
        "id": 7,
        "prompt": [{"role": "system", "content": "Be brief."}, USER, {"role": "assistant", "content": "Green."}]
        + [{"role": "user", "content": "Another?"}],
        "chosen": {"role": "assistant", "content": "Teal."},
        "rejected": [{"role": "assistant", "content": "No."}],
    },
]
BAD = [
    ({"id": "empty", "prompt": [], "chosen": "x", "rejected": "y"}, "'prompt' is an empty list"),
    ({"id": "same", "prompt": [USER], "chosen": "a", "rejected": "a"}, "same conversation"),
    ("not an object", "not an object"),
]
COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "chosen_labels", "rejected_labels")


def tokenize(*args: str) -> int:
    return main(["tokenize", *args, "--tokenizer", "demo", "--task", "preference", "--quiet"])


def check_against_the_api(out: Path, rows: list) -> int:
    """Every output column against tokenize_preference_batch on the same rows; returns the count of
    ids and labels compared."""
    table = read_parts(out)
    good = [i for i, r in enumerate(rows) if isinstance(r, dict)]
    batch = demo_tokenizer().tokenize_preference_batch([rows[i] for i in good], on_error="skip")
    assert table.column("row").to_pylist() == [good[int(i)] for i in batch.rows]
    compared = 0
    for k in range(len(batch)):
        want = batch[k]
        for name in COLUMNS:
            got = np.asarray(table.column(name)[k].as_py())
            assert np.array_equal(got, want[name]), (k, name)
            compared += len(got)
        assert table.column("preference_flags")[k].as_py() == want["flags"]
    ids = [r.get("id") if isinstance(r, dict) else None for r in rows]
    assert table.column("id").to_pylist() == [
        None if ids[r] is None else ids[r] if isinstance(ids[r], str) else json.dumps(ids[r])
        for r in table.column("row").to_pylist()
    ]
    return compared


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_pairs_equal_the_api_and_bad_rows_are_reported(tmp_path, fmt):
    rows = [GOOD[0], BAD[0][0], GOOD[1], BAD[1][0], GOOD[2]]
    if fmt == "jsonl":
        rows = rows + [BAD[2][0]]
        src = write_jsonl(tmp_path / "in.jsonl", rows)
    else:
        # Parquet holds one type per column: completions as message lists, ids as strings.
        rows = [
            {**r, "id": str(r["id"]), "chosen": _messages(r["chosen"]), "rejected": _messages(r["rejected"])}
            for r in rows
        ]
        rows = [{"prompt": None, **r} for r in rows]
        src = write_parquet(tmp_path / "in.parquet", rows)
    out = tmp_path / "out"
    assert tokenize(str(src), "-o", str(out)) == 0
    assert check_against_the_api(out, [_unnull(r) for r in rows]) > 0
    errors = read_errors(out)
    assert sorted(errors) == [1, 3] + ([5] if fmt == "jsonl" else [])
    assert BAD[0][1] in errors[1] and BAD[1][1] in errors[3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "preference" and manifest["rows_out"] == 3
    assert manifest["rows_in"] == manifest["rows_out"] + manifest["rows_failed"] + manifest["rows_dropped"]
    assert manifest["preference_flags"] == {}
    table = read_parts(out)
    tokens = sum(len(v) for c in COLUMNS[:3] for v in table.column(c).to_pylist())
    trained = sum(sum(x != -100 for x in v) for c in COLUMNS[3:] for v in table.column(c).to_pylist())
    assert (manifest["tokens"], manifest["trained_tokens"]) == (tokens, trained)


def _messages(completion):
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return completion if isinstance(completion, list) else [completion]


def _unnull(row):
    return {k: v for k, v in row.items() if v is not None} if isinstance(row, dict) else row


def test_flagged_pairs_are_counted(tmp_path, monkeypatch):
    rows = GOOD * 2
    real = pipeline_job.PreferenceStage._call

    def flagging(self, batch_rows):
        result = real(self, batch_rows)
        result.flags = [["prompt_differs"] if i % 2 else [] for i in range(len(result))]
        return result

    monkeypatch.setattr(pipeline_job.PreferenceStage, "_call", flagging)
    out = tmp_path / "out"
    assert tokenize(str(write_jsonl(tmp_path / "in.jsonl", rows)), "-o", str(out)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["preference_flags"] == {"pairs": 3, "prompt_differs": 3}
    assert [bool(f) for f in read_parts(out).column("preference_flags").to_pylist()] == [False, True] * 3


@pytest.mark.parametrize(
    "extra,flag",
    [(["--mode", "last"], "--mode"), (["--pack", "64"], "--pack"), (["--messages-field", "m"], "--messages-field")],
)
def test_sft_only_options_are_usage_errors(tmp_path, capsys, extra, flag):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD)
    assert tokenize(str(src), "-o", str(tmp_path / "out"), *extra) == 2
    err = capsys.readouterr().err
    assert f"{flag} cannot be combined with --task preference" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_resume_refuses_another_task(tmp_path, monkeypatch, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", GOOD * 3)
    args = [str(src), "-o", str(tmp_path / "out"), "--rows-per-file", "2", "--batch-rows", "2"]
    crash_at_commit(monkeypatch, 2)
    with pytest.raises(Crash):
        tokenize(*args)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["tokenize", *args, "--tokenizer", "demo", "--quiet", "--resume"]) == 2
    assert "different task" in capsys.readouterr().err
    assert tokenize(*args, "--resume") == 0
    assert check_against_the_api(tmp_path / "out", GOOD * 3) > 0
