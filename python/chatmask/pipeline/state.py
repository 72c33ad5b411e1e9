"""The commit/resume protocol: what is committed, how a resumed run reconciles the directory, and
the final check that every input row is in exactly one place.

* **Commit point.** A global row ``next_row`` such that every row before it is in a committed
  part or in the first ``errors_bytes`` bytes of ``errors.jsonl`` (or ``dropped_bytes`` of
  ``dropped.jsonl``), and no row after it is. At a commit the side files are fsynced first, then
  the part is renamed, then ``progress.json`` is atomically replaced (:class:`State`).
* **Resume** truncates the side files to their committed length, deletes temporary files and
  any part ``progress.json`` does not list, skips the input rows before ``next_row`` and carries
  on numbering parts: rows of an uncommitted part are redone. A kill between any two steps
  leaves a state that this reconciles.
* **Resume checks** that the job configuration (:func:`job_config`: inputs, tokenizer
  fingerprint, mode, policy, fields, chatmask version) equals the interrupted run's, and refuses
  otherwise. ``--rows-per-file`` and ``--batch-rows`` may change. After an input stopped
  decoding (``read_error`` in ``progress.json``), that file and the ones after it may have
  changed size (fixed or replaced); the files before it may not.
* **Fresh runs refuse a non-empty OUTDIR**; ``--resume`` on a missing or empty OUTDIR starts
  fresh, and on a completed one (``manifest.json`` with ``complete: true``) does nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .._usage import UsageError
from ..io import sinks
from ..io.readers import InputFile, pyarrow_modules
from ..io.sinks import DROPPED, ERRORS, MANIFEST, PROGRESS
from .packing import pack_config
from .tokenizer import LoadedTokenizer

STATE_VERSION = 2


@dataclass
class State:
    """What is committed: everything before `next_row` is in `parts` or the side files' committed bytes."""

    config: dict[str, Any]
    next_row: int = 0
    parts: list[dict[str, Any]] = field(default_factory=list)
    errors_bytes: int = 0
    rows_out: int = 0
    rows_failed: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    seconds: float = 0.0
    # Policy runs: rows dropped (the first `dropped_bytes` bytes of dropped.jsonl), span methods
    # and truncated rows of the committed parts.
    dropped_bytes: int = 0
    rows_dropped: int = 0
    span_methods: dict[str, int] = field(default_factory=dict)
    rows_truncated: int = 0
    # Committed output rows whose inputs held control-token text; None once a batch went
    # unchecked (a template on the Jinja2 path).
    rows_with_control_tokens: int | None = 0
    # Reference modes: committed rows whose reference mask is wrong, by cause (a row may have
    # several; "raises" counts error rows), "rows" in total, "unmeasured" rows not judged.
    reference_wrong: dict[str, int] = field(default_factory=dict)
    # Where the last run stopped because an input did not decode (InputReadError.to_json()).
    read_error: dict[str, Any] | None = None
    # --pack: packs, tokens, capacity, rows_split, rows_truncated, rows_unpackable of the committed parts.
    pack: dict[str, int] = field(default_factory=dict)
    # --task preference: committed pairs with a flag ("pairs"), and per flag.
    preference_flags: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        state = cls(**known)
        if "rows_with_control_tokens" not in data:
            state.rows_with_control_tokens = None  # an older progress.json: its rows were never checked
        return state


def job_config(opts: Any, inputs: Sequence[InputFile], tokenizer: LoadedTokenizer) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (the resume fingerprint)."""
    from .. import __version__

    return {
        "task": opts.task,
        "inputs": [{"path": os.path.abspath(f.path), "size": f.size} for f in inputs],
        "tokenizer_sha256": tokenizer.sha256,
        "tokenizer": tokenizer.fingerprint,
        "mode": None if opts.policy is not None else opts.mode,
        "messages_field": opts.messages_field,
        "tools_field": opts.tools_field,
        "finish_reason_field": opts.finish_reason_field,
        # The whole policy (labelling and shaping, sanitize_control_tokens included); None without one.
        "policy": None if opts.policy is None else opts.policy.to_dict(),
        "pack": pack_config(opts),
        "chatmask_version": __version__,
    }


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], read_error: Mapping[str, Any] | None) -> list[str]:
    differ = [k for k in new if k != "inputs" and old.get(k) != new[k]]
    old_inputs, new_inputs = old.get("inputs") or [], new["inputs"]
    if [f["path"] for f in old_inputs] != [f["path"] for f in new_inputs]:
        differ.insert(0, "inputs")
    else:
        # After a read error, the broken file and the ones after it may have been fixed or replaced.
        fixed_from = len(new_inputs) if read_error is None else int(read_error["input_index"])
        if [f["size"] for f in old_inputs[:fixed_from]] != [f["size"] for f in new_inputs[:fixed_from]]:
            differ.insert(0, "input sizes")
    return differ


def start(out: str, config: dict[str, Any]) -> State:
    """A new job: progress.json first (so any later kill is resumable), then empty side files."""
    state = State(config)
    sinks.write_json_atomic(os.path.join(out, PROGRESS), state.to_json())
    open(os.path.join(out, ERRORS), "wb").close()
    if config.get("policy") is not None:
        open(os.path.join(out, DROPPED), "wb").close()
    return state


def prepare_outdir(out: str, resume: bool, config: dict[str, Any]) -> State | None:
    """A fresh or reconciled state, or None when a resumed job is already complete."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"output {out!r} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    entries = os.listdir(out)
    if not resume:
        if entries:
            what = (
                "an interrupted job (progress.json): add --resume to finish it"
                if PROGRESS in entries
                else "a finished job (manifest.json)"
                if MANIFEST in entries
                else "files"
            )
            raise UsageError(f"output directory {out!r} is not empty: it holds {what}; use an empty or new directory")
        return start(out, config)
    if MANIFEST in entries and PROGRESS not in entries:
        manifest = json.loads(Path(out, MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("complete"):
            return None
    if PROGRESS not in entries:
        # Killed before the first progress.json landed, the directory holds at most a temp file.
        if [e for e in entries if not e.endswith(".tmp")]:
            raise UsageError(f"--resume: {out!r} is not empty but has no {PROGRESS}; it is not a chatmask job")
        for name in entries:
            os.remove(os.path.join(out, name))
        return start(out, config)
    state = State.from_json(json.loads(Path(out, PROGRESS).read_text(encoding="utf-8")))
    differ = _differences(state.config, config, state.read_error)
    if differ:
        raise UsageError(
            f"--resume: the job in {out!r} was started with different {', '.join(differ)}; "
            "rerun with the same inputs, tokenizer and options, or use a new directory"
        )
    state.config = config  # sizes of a fixed input are the new ones from now on
    committed = {p["file"] for p in state.parts}
    for name in committed:
        if not os.path.isfile(os.path.join(out, name)):
            raise UsageError(f"--resume: committed part {name} is missing from {out!r}")
    for name in entries:
        if name.endswith(".tmp") or (name.startswith("part-") and name not in committed):
            os.remove(os.path.join(out, name))  # an uncommitted part (or temp file): its rows are redone
    files = [(ERRORS, state.errors_bytes)]
    if config.get("policy") is not None:
        files.append((DROPPED, state.dropped_bytes))
    for name, committed_bytes in files:
        path = os.path.join(out, name)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if size < committed_bytes:
            raise UsageError(f"--resume: {name} is shorter than its committed length; the output is damaged")
        sinks.truncate_to(path, committed_bytes)
    return state


def _side_rows(outdir: str, name: str, rows_in: int) -> np.ndarray:
    """The rows listed in errors.jsonl or dropped.jsonl (strictly increasing, within the input)."""
    rows: list[int] = []
    path = os.path.join(outdir, name)
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                rows.append(int(json.loads(line)["row"]))
    out = np.array(rows, dtype=np.int64)
    if len(out) and not (np.all(np.diff(out) > 0) and out[0] >= 0 and out[-1] < rows_in):
        raise AssertionError(f"{name} rows are not strictly increasing within the input")
    return out


def _part_rows(pq: Any, path: str) -> np.ndarray:
    """The input rows of a part: its ``row`` column, or (packs) the distinct rows of its ``rows`` lists."""
    if "row" in pq.read_schema(path).names:
        return pq.read_table(path, columns=["row"]).column("row").to_numpy()
    import pyarrow.compute as pc

    flat = pc.list_flatten(pq.read_table(path, columns=["rows"]).column("rows")).to_numpy()
    return np.unique(flat[flat >= 0])


def verify_output(outdir: str, rows_in: int, parts: Sequence[Mapping[str, Any]]) -> None:
    """Check that every row before `rows_in` is in exactly one part, in errors.jsonl or in
    dropped.jsonl (streaming, sorted merge).

    Parts hold increasing row numbers and the side files are in row order, so strictly
    increasing sequences that are disjoint and add up to `rows_in` in-range rows are exactly
    ``range(rows_in)``.
    """
    _, pq = pyarrow_modules()
    error_rows = _side_rows(outdir, ERRORS, rows_in)
    dropped_rows = _side_rows(outdir, DROPPED, rows_in)
    if len(dropped_rows):
        merged = np.sort(np.concatenate([error_rows, dropped_rows]))
        if np.any(np.diff(merged) == 0):
            raise AssertionError(f"a row is both in {ERRORS} and in {DROPPED}")
        error_rows = merged
    previous = -1
    count = len(error_rows)
    for part in parts:
        rows = _part_rows(pq, os.path.join(outdir, part["file"]))
        if len(rows) != part["rows"]:
            raise AssertionError(f"{part['file']} holds {len(rows)} rows, progress says {part['rows']}")
        if len(rows) == 0:
            continue
        if rows[0] <= previous or not np.all(np.diff(rows) > 0) or rows[-1] >= rows_in:
            raise AssertionError(f"{part['file']}: rows out of order or out of range")
        lo, hi = np.searchsorted(error_rows, [rows[0], rows[-1] + 1])
        inside = error_rows[lo:hi]
        if len(inside) and np.any(rows[np.minimum(np.searchsorted(rows, inside), len(rows) - 1)] == inside):
            raise AssertionError(f"{part['file']}: a row is both in the part and in {ERRORS} or {DROPPED}")
        previous = int(rows[-1])
        count += len(rows)
    if count != rows_in:
        raise AssertionError(f"{count} rows accounted for, {rows_in} read")
