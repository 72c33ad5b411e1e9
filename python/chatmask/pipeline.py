"""The offline corpus pipeline behind ``chatmask tokenize`` and ``chatmask show``.

``tokenize`` streams JSONL (plain, ``.gz``, ``.zst``) and Parquet files through
:meth:`ChatTokenizer.tokenize_batch` and writes Parquet part files, ``errors.jsonl`` and a
``manifest.json``. It is built so that **no input row is ever lost or duplicated**, even when the
process is killed at any moment and rerun with ``--resume``.

Decisions (and why):

* **Row numbers.** The global row number is the 0-based position across all inputs, in the order
  given (a directory contributes its ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` and
  ``*.parquet`` files, sorted by name). Every row ends up in exactly one place: a part file
  (column ``row``) or ``errors.jsonl``. Nothing is silently dropped, so ``rows_in ==
  rows_out + rows_failed`` (``+ rows_dropped`` under a policy, see below) always holds and is
  checked before the manifest is written.
* **JSONL lines** are split on ``b"\\n"`` only, on bytes, and each line is decoded as UTF-8 on its
  own: ``str.splitlines`` would also break on U+2028, U+0085, ``\\r`` and friends, which real text
  contains inside JSON strings. A trailing ``\\r`` (CRLF files) is JSON whitespace and harmless.
  A UTF-8 byte order mark at the very start of a file is ignored. Lines are parsed with
  ``json.loads(strict=False)``: a raw ``\\r`` or tab inside a string value (common in scraped
  dumps) is kept as text instead of failing the row.
* **Empty lines are rows.** A blank or whitespace-only line is an error row (``"empty line"``)
  rather than being skipped, so a JSONL row number is always its line number (0-based, plus
  the rows of the inputs before it). The newline that ends the last line does not start a row.
* **Per-row fields.** A row must be a JSON object whose ``--messages-field`` is a list; anything
  else (invalid JSON or UTF-8, a non-object, a missing or non-list messages field) is an error
  row. ``--tools-field`` (default ``tools``) is used when present and not null; a string is
  parsed as JSON (many datasets store tools that way, and Parquet cannot hold free-form JSON
  schemas); anything but a list is an error row. ``--finish-reason-field`` must hold a string
  or null.
* **Parquet nulls.** Arrow stores a list of messages as a list of structs with one shared set of
  keys, so every message of a Parquet file carries every key any message had (a user turn gets
  ``tool_calls: None``). Keys whose value is null are removed from Parquet messages and tools
  (recursively), so a conversation tokenizes the same from Parquet as from the JSONL it came
  from; templates that test ``'tool_calls' in message`` would otherwise fail.
* **Output columns.** ``row`` (int64), ``input_ids`` (list<int32>), ``labels`` (list<int64>,
  ``-100`` = masked), ``id`` (string: the row's ``id`` field, JSON-encoded when it is not a
  string, null when absent) and ``source_file`` (the input file's name). The schema is the same
  for every part, so all parts read back as one dataset.
* **Commit protocol (what makes resume exact).** A part is written to ``.part-NNNNN.parquet.tmp``
  and becomes ``part-NNNNN.parquet`` by ``os.replace`` once it holds ``--rows-per-file`` rows (or
  the input ends). Error lines are appended to ``errors.jsonl`` in row order and flushed per
  batch. A commit point is a global row ``next_row`` such that every row before it is in a
  committed part or in the first ``errors_bytes`` bytes of ``errors.jsonl``, and no row after it
  is. At a commit, the errors up to the part's last row are appended and fsynced first, then
  the part is renamed, then ``progress.json`` (``next_row``, committed parts, ``errors_bytes``,
  counters) is atomically replaced. ``--resume`` truncates ``errors.jsonl`` to ``errors_bytes``,
  deletes temporary files and any part not listed in ``progress.json``, skips the input rows
  before ``next_row`` and carries on numbering parts: rows of an uncommitted part are redone.
  A kill between any two steps leaves a state that this reconciles.
* **Resume checks** that the inputs (paths and sizes), tokenizer hash, mode and field options are
  those of the interrupted run, and refuses otherwise: mixing two configurations in one output
  would be silent corruption. ``--rows-per-file`` and ``--batch-rows`` may change.
* **Fresh runs refuse a non-empty OUTDIR** (any content): the pipeline deletes stray part files
  on resume, so it must own its directory. ``--resume`` on a missing or empty OUTDIR starts
  fresh, and on a completed one (``manifest.json``) does nothing.
* **Finish.** ``manifest.json`` is written atomically at the end, then ``progress.json`` is
  removed; the directory then holds ``part-*.parquet``, ``errors.jsonl`` and ``manifest.json``.
  ``seconds`` in the manifest adds up the runs (up to each run's last commit).
* **Training policies** (``--policy FILE``, a JSON object of :class:`chatmask.MaskPolicy`
  fields). The policy replaces ``--mode``, ``--finish-reason-field``, ``--messages-field`` and
  ``--tools-field`` (giving any of them with ``--policy`` is a usage error: the policy's
  ``field_messages`` / ``field_tools`` name the columns, its labelling fields decide the
  labels). Each row is handed to ``tokenize_batch(policy=...)`` keyed by the policy's own
  fields (messages, tools, ``field_system``), so the policy's shaping (role map, property
  mappings such as ShareGPT's ``from``/``value``, ``drop_system_message``, ``split_thinking``)
  applies to the row as it is in the file; the same checks as above still make a row an error
  row first (the messages field missing or not a list, bad tools), and a JSONL line that is a
  JSON array is read as the list of messages. Parts gain ``message_index`` (list<int32>,
  aligned with ``input_ids``; -1 for template text), ``span_method`` (string) and
  ``truncated`` (int32, tokens cut by ``overflow="truncate_*"``). Rows the policy drops
  (``overflow="drop"``) go to ``dropped.jsonl`` (``row``, ``id``, ``reason``,
  ``source_file``), written and committed exactly like ``errors.jsonl`` (its committed length
  is ``dropped_bytes``), so ``rows_in == rows_out + rows_failed + rows_dropped``. The policy
  (``MaskPolicy.to_dict()``) is part of what ``--resume`` must match. ``dropped.jsonl`` exists
  only for policy runs; without a policy nothing is ever dropped.
* **Control tokens.** A row whose text holds a control token's text (``<|im_start|>`` typed by a
  user) is counted (``rows_with_control_tokens``, over output rows) with or without a policy;
  plain encoding turns such text into the control token, ``--sanitize-control-tokens`` (which
  sets the policy's ``sanitize_control_tokens``, so it needs ``--policy``) encodes it as text,
  as transformers 5 does. Rows of a template on the Jinja2 path are not checked: then the
  manifest's count is null.

``show`` renders one conversation's tokens: trained tokens green, masked ones dim, special
tokens in reverse video (without colour: trained spans in ``[[...]]``, special tokens in
``⟦...⟧``), newlines as ``↵`` plus a real newline. A token is *special* when its text is a value
of ``tok.special_tokens``, an added token marked ``special`` in the ``tokenizer.json`` that was
loaded, or looks like a control token (``<|...|>``, ``<｜...｜>``, ``[INST]``-style upper-case
brackets, ``<s>``/``</s>``, ``<start_of_turn>``-style). The compiled core does not expose its
added-token table, so the file is read again for that. The HTML view starts a new block at each
turn-opening special token (one whose text contains ``start``, ``[INST]``, or ``<|user|>``-style
role tokens).
"""

from __future__ import annotations

import gzip
import dataclasses
import hashlib
import html
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

import numpy as np

from ._tokenizer import MODES, ChatTokenizer
from .errors import ChatMaskError
from .policy import MaskPolicy

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
PROGRESS = "progress.json"
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
DROPPED = "dropped.jsonl"
DROP_REASON = "longer than max_length"
READ_CHUNK = 1 << 20


class UsageError(Exception):
    """A problem with the command line or the environment: reported without a traceback, exit 2."""


# --------------------------------------------------------------------------------------------
# Optional dependencies (imported lazily so the package keeps numpy as its only hard dependency)
# --------------------------------------------------------------------------------------------


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError("chatmask tokenize needs pyarrow to write Parquet: pip install pyarrow") from e
    return pa, pq


def _zstd_reader(raw: IO[bytes]) -> IO[bytes]:
    try:
        import zstandard
    except ImportError as e:
        raise UsageError("reading .zst input needs the zstandard module: pip install zstandard") from e
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedTokenizer:
    """A tokenizer plus what the manifest records about it (and what `show` needs to see specials)."""

    tok: ChatTokenizer
    name: str
    sha256: str
    tokenizer_json: str | None


def load_tokenizer(spec: str) -> LoadedTokenizer:
    """``demo`` or a local tokenizer directory; never a download (a hub id is a usage error)."""
    if spec == "demo":
        from .demo import demo_tokenizer, demo_tokenizer_json

        text = demo_tokenizer_json()
        return LoadedTokenizer(demo_tokenizer(), "demo", hashlib.sha256(text.encode()).hexdigest(), text)
    if not os.path.isdir(spec):
        raise UsageError(
            f"--tokenizer {spec!r} is not a local directory, and chatmask does not download tokenizers: "
            "pass a directory holding tokenizer.json and tokenizer_config.json "
            "(e.g. from `huggingface-cli download`), or `demo`"
        )
    try:
        tok = ChatTokenizer.from_pretrained(spec)
    except ChatMaskError as e:
        raise UsageError(f"cannot load tokenizer from {spec!r}: {e}") from e
    path = os.path.join(spec, "tokenizer.json")
    data = Path(path).read_bytes() if os.path.isfile(path) else b""
    return LoadedTokenizer(tok, spec, hashlib.sha256(data).hexdigest(), data.decode("utf-8", "replace") or None)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass
class InputFile:
    path: str
    kind: str  # "jsonl" | "parquet"
    size: int

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _kind(path: str) -> str:
    return "parquet" if path.endswith(PARQUET_SUFFIX) else "jsonl"


def resolve_inputs(paths: Sequence[str]) -> list[InputFile]:
    """Files as given, directories expanded to their supported files (sorted); missing ones are errors."""
    if not paths:
        raise UsageError("no input given")
    out: list[InputFile] = []
    for p in paths:
        if os.path.isdir(p):
            names = sorted(n for n in os.listdir(p) if n.endswith(JSONL_SUFFIXES + (PARQUET_SUFFIX,)))
            files = [os.path.join(p, n) for n in names if os.path.isfile(os.path.join(p, n))]
            if not files:
                raise UsageError(f"input directory {p!r} has no *.jsonl, *.jsonl.gz, *.jsonl.zst or *.parquet files")
        elif os.path.isfile(p):
            files = [p]
        else:
            raise UsageError(f"input {p!r} does not exist")
        out.extend(InputFile(f, _kind(f), os.path.getsize(f)) for f in files)
    return out


class _Counter:
    """Where reading stands, for the progress display's ETA (fraction of total work done)."""

    def __init__(self, inputs: Sequence[InputFile]) -> None:
        self.sizes = [max(f.size, 1) for f in inputs]
        self.total = float(sum(self.sizes))
        self.file_index = 0
        self.file_fraction = 0.0

    def fraction(self) -> float:
        done = sum(self.sizes[: self.file_index]) + self.file_fraction * self.sizes[self.file_index]
        return min(done / self.total, 1.0) if self.total else 1.0


def _jsonl_lines(path: str, counter: _Counter | None = None) -> Iterator[bytes]:
    """A JSONL file's lines as bytes, split on b"\\n" only (never on U+2028 or \\r), streamed."""
    size = max(os.path.getsize(path), 1)
    with open(path, "rb") as raw:
        if path.endswith(".gz"):
            stream: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb")
        elif path.endswith(".zst"):
            stream = _zstd_reader(raw)
        else:
            stream = raw
        try:
            parts: list[bytes] = []
            first = True
            decoded = 0  # bytes out of the decompressor so far
            consumed = 0  # bytes of the lines yielded so far
            while True:
                chunk = stream.read(READ_CHUNK)
                if not chunk:
                    break
                decoded += len(chunk)
                if first:
                    first = False
                    if chunk.startswith(b"\xef\xbb\xbf"):
                        chunk = chunk[3:]
                # Progress counts the lines handed out (not the read-ahead), in on-disk bytes.
                scale = raw.tell() / decoded / size
                pieces = chunk.split(b"\n")
                if len(pieces) == 1:
                    parts.append(chunk)
                    continue
                parts.append(pieces[0])
                pieces[0] = b"".join(parts)
                parts = [pieces.pop()]
                if counter is None:
                    yield from pieces
                    continue
                for line in pieces:
                    consumed += len(line) + 1
                    counter.file_fraction = consumed * scale
                    yield line
            tail = b"".join(parts)
            if tail:
                yield tail  # a last line without its newline
        finally:
            if stream is not raw:
                stream.close()


def _strip_nulls(value: Any) -> Any:
    """Drop null-valued keys from dicts, recursively (Arrow structs give every key to every row)."""
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


def _parquet_rows(
    path: str, fields: Sequence[str], batch_rows: int, skip: int, counter: _Counter | None = None
) -> Iterator[dict[str, Any] | None]:
    """A Parquet file's rows (only the columns we use), skipping the first `skip` rows cheaply."""
    _, pq = _pyarrow()
    pf = pq.ParquetFile(path)
    total = max(pf.metadata.num_rows, 1)
    names = set(pf.schema_arrow.names)
    columns = [c for c in dict.fromkeys(fields) if c in names]
    done = 0
    if skip >= pf.metadata.num_rows:
        for _ in range(pf.metadata.num_rows):
            yield None  # the caller only counts these
        return
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        n = batch.num_rows
        if done + n <= skip:
            done += n
            for _ in range(n):
                yield None
            continue
        rows = batch.to_pylist() if columns else [{} for _ in range(n)]
        for i, row in enumerate(rows):
            if done + i < skip:
                yield None
            else:
                yield row
        done += n
        if counter is not None:
            counter.file_fraction = done / total


@dataclass
class RawRow:
    """One input row before parsing: a JSONL line (bytes) or a Parquet row (dict); None when skipped."""

    row: int
    source: int
    payload: bytes | dict[str, Any] | None


def iter_raw_rows(
    inputs: Sequence[InputFile],
    fields: Sequence[str],
    batch_rows: int,
    skip: int = 0,
    counter: _Counter | None = None,
) -> Iterator[RawRow]:
    """Every input row in global order; rows before `skip` come with payload None (not parsed)."""
    row = 0
    for index, f in enumerate(inputs):
        if counter is not None:
            counter.file_index, counter.file_fraction = index, 0.0
        if f.kind == "parquet":
            for payload in _parquet_rows(f.path, fields, batch_rows, max(skip - row, 0), counter):
                yield RawRow(row, index, payload)
                row += 1
        else:
            for line in _jsonl_lines(f.path, counter):
                yield RawRow(row, index, None if row < skip else line)
                row += 1
        if counter is not None:
            counter.file_fraction = 1.0


@dataclass
class ParsedRow:
    """A row ready for `tokenize_batch`, or the reason it cannot be tokenized."""

    conversation: dict[str, Any] | None
    finish_reason: str | None = None
    id: str | None = None
    error: str | None = None


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def parse_row(
    payload: bytes | dict[str, Any],
    messages_field: str = "messages",
    tools_field: str = "tools",
    finish_reason_field: str | None = None,
    *,
    strip_nulls: bool | None = None,
) -> ParsedRow:
    """One JSONL line or Parquet row to a conversation; every failure is a message, never an exception.

    Null-valued keys are dropped from the messages and tools of a row given as a dict (a Parquet
    row) unless `strip_nulls` says otherwise (the `datasets` / Ray adapters strip them by Arrow
    type first, keeping the nulls of JSON-typed values).
    """
    obj, from_parquet, error = _load_payload(payload)
    if error is not None:
        return ParsedRow(None, error=error)
    if not isinstance(obj, dict):
        return ParsedRow(None, error=f"row is a JSON {_type_name(obj)}, not an object")
    row_id = _row_id(obj)
    messages, tools, error = _messages_and_tools(obj, messages_field, tools_field)
    if error is not None:
        return ParsedRow(None, id=row_id, error=error)
    finish = None
    if finish_reason_field is not None:
        finish = obj.get(finish_reason_field)
        if finish is not None and not isinstance(finish, str):
            return ParsedRow(
                None, id=row_id, error=f"field {finish_reason_field!r} is a {_type_name(finish)}, not a string"
            )
    if from_parquet if strip_nulls is None else strip_nulls:
        messages = _strip_nulls(messages)
        tools = _strip_nulls(tools)
    conversation: dict[str, Any] = {"messages": messages}
    if tools is not None:
        conversation["tools"] = tools
    return ParsedRow(conversation, finish, row_id)


def _load_payload(payload: bytes | dict[str, Any]) -> tuple[Any, bool, str | None]:
    """(the row's JSON value, whether it came from Parquet, or the reason it cannot be read)."""
    if isinstance(payload, (bytes, bytearray)):
        if not payload.strip():
            return None, False, "empty line"
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, False, f"invalid UTF-8: {e}"
        try:
            obj = json.loads(text, strict=False)  # raw control characters (\r, tabs) inside strings are kept
        except (ValueError, RecursionError) as e:
            return None, False, f"invalid JSON: {e}"
        return obj, False, None
    return payload, True, None


def _row_id(obj: Mapping[str, Any]) -> str | None:
    raw_id = obj.get("id")
    return None if raw_id is None else raw_id if isinstance(raw_id, str) else json.dumps(raw_id)


def _messages_and_tools(obj: Mapping[str, Any], messages_field: str, tools_field: str) -> tuple[Any, Any, str | None]:
    """A row's messages (a list) and tools (a list, a JSON string parsed, or None), or an error."""
    if messages_field not in obj:
        return None, None, f"missing field {messages_field!r}"
    messages = obj[messages_field]
    if not isinstance(messages, list):
        return None, None, f"field {messages_field!r} is a {_type_name(messages)}, not a list of messages"
    tools = obj.get(tools_field)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            return None, None, f"field {tools_field!r} is a string but not JSON: {e}"
    if tools is not None and not isinstance(tools, list):
        return None, None, f"field {tools_field!r} is a {_type_name(tools)}, not a list"
    return messages, tools, None


def parse_policy_row(
    payload: bytes | dict[str, Any] | list[Any], policy: MaskPolicy, *, strip_nulls: bool | None = None
) -> ParsedRow:
    """One row for ``tokenize_batch(policy=...)``: the row keyed by the policy's own fields.

    The conversation is ``{field_messages: [...], field_tools: [...] (if any), field_system: ...
    (if set and present)}``, the messages as they are in the row (the policy maps roles and
    properties when it tokenizes), or the row itself when it is a list (a JSONL line holding a
    JSON array of messages). The checks are `parse_row`'s; a failure is a message, never an
    exception. Null-valued keys are dropped from messages and tools as in `parse_row`.
    """
    if isinstance(payload, list):
        obj, from_parquet, error = payload, False, None
    else:
        obj, from_parquet, error = _load_payload(payload)
    if error is not None:
        return ParsedRow(None, error=error)
    strip = from_parquet if strip_nulls is None else strip_nulls
    if isinstance(obj, list):
        return ParsedRow({policy.field_messages: _strip_nulls(obj) if strip else obj})
    if not isinstance(obj, dict):
        return ParsedRow(None, error=f"row is a JSON {_type_name(obj)}, not an object or a list of messages")
    row_id = _row_id(obj)
    messages, tools, error = _messages_and_tools(obj, policy.field_messages, policy.field_tools)
    if error is not None:
        return ParsedRow(None, id=row_id, error=error)
    if strip:
        messages = _strip_nulls(messages)
        tools = _strip_nulls(tools)
    conversation: dict[str, Any] = {policy.field_messages: messages}
    if tools is not None:
        conversation[policy.field_tools] = tools
    if policy.field_system is not None and obj.get(policy.field_system) is not None:
        conversation[policy.field_system] = obj[policy.field_system]
    return ParsedRow(conversation, None, row_id)


def _fields(messages_field: str, tools_field: str, finish_reason_field: str | None) -> list[str]:
    return [messages_field, tools_field, "id"] + ([finish_reason_field] if finish_reason_field else [])


def _policy_fields(policy: MaskPolicy) -> list[str]:
    """The columns a policy run reads (Parquet reads only these)."""
    return [policy.field_messages, policy.field_tools, "id"] + ([policy.field_system] if policy.field_system else [])


def load_policy(path: str) -> MaskPolicy:
    """A :class:`MaskPolicy` from a JSON file of its fields; any problem is a UsageError naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--policy {path!r}: cannot read it: {e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--policy {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--policy {path!r} must hold a JSON object of MaskPolicy fields, not a JSON {_type_name(data)}")
    try:
        policy = MaskPolicy.from_dict(data)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--policy {path!r}: {e}") from None
    for name in ("field_messages", "field_tools", "field_system"):
        value = getattr(policy, name)
        if not isinstance(value, str) and not (name == "field_system" and value is None):
            raise UsageError(f"--policy {path!r}: {name} must be a string, not a JSON {_type_name(value)}")
    return policy


# --------------------------------------------------------------------------------------------
# tokenize
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizeOptions:
    """What `run_tokenize` does. `mode`, `messages_field` and `tools_field` default (None) to
    ``last``, ``messages`` and ``tools`` without a `policy`; with one they must stay None (the
    policy names the fields and decides the labels), as must `finish_reason_field`.
    `sanitize_control_tokens` sets the policy's field and needs a `policy`."""

    inputs: list[str]
    outdir: str
    tokenizer: str
    mode: str | None = None
    threads: int | None = None
    messages_field: str | None = None
    tools_field: str | None = None
    finish_reason_field: str | None = None
    rows_per_file: int = 100_000
    batch_rows: int = 4096
    resume: bool = False
    quiet: bool = False
    policy: MaskPolicy | None = None
    sanitize_control_tokens: bool = False


def _resolve_options(opts: TokenizeOptions) -> TokenizeOptions:
    """The options with their defaults filled in and the policy settled; UsageError on a conflict."""
    if opts.policy is not None and not isinstance(opts.policy, MaskPolicy):
        raise UsageError(f"policy must be a chatmask.MaskPolicy, not {type(opts.policy).__name__}")
    if opts.policy is None:
        if opts.sanitize_control_tokens:
            raise UsageError(
                "--sanitize-control-tokens needs --policy (it sets the policy's sanitize_control_tokens; "
                "the reference modes encode control-token text as the tokens, as transformers 4 does)"
            )
        mode = opts.mode if opts.mode is not None else "last"
        if mode not in MODES:
            raise UsageError(f"--mode must be one of {', '.join(MODES)}")
        return dataclasses.replace(
            opts,
            mode=mode,
            messages_field=opts.messages_field if opts.messages_field is not None else "messages",
            tools_field=opts.tools_field if opts.tools_field is not None else "tools",
        )
    given = [
        flag
        for flag, value in (
            ("--mode", opts.mode),
            ("--finish-reason-field", opts.finish_reason_field),
            ("--messages-field", opts.messages_field),
            ("--tools-field", opts.tools_field),
        )
        if value is not None
    ]
    if given:
        raise UsageError(
            f"{', '.join(given)} cannot be combined with --policy: the policy decides the labels, and its "
            "field_messages / field_tools / field_system name the fields"
        )
    policy = opts.policy
    if opts.sanitize_control_tokens and not policy.sanitize_control_tokens:
        policy = dataclasses.replace(policy, sanitize_control_tokens=True)
    return dataclasses.replace(
        opts, policy=policy, messages_field=policy.field_messages, tools_field=policy.field_tools
    )


@dataclass
class _State:
    """What is committed: everything before `next_row` is in `parts` or the first `errors_bytes` bytes."""

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

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "config": self.config,
            "next_row": self.next_row,
            "parts": self.parts,
            "errors_bytes": self.errors_bytes,
            "rows_out": self.rows_out,
            "rows_failed": self.rows_failed,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "seconds": self.seconds,
            "dropped_bytes": self.dropped_bytes,
            "rows_dropped": self.rows_dropped,
            "span_methods": self.span_methods,
            "rows_truncated": self.rows_truncated,
            "rows_with_control_tokens": self.rows_with_control_tokens,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _State:
        return cls(
            config=dict(data["config"]),
            next_row=int(data["next_row"]),
            parts=list(data["parts"]),
            errors_bytes=int(data["errors_bytes"]),
            rows_out=int(data["rows_out"]),
            rows_failed=int(data["rows_failed"]),
            tokens=int(data["tokens"]),
            trained_tokens=int(data["trained_tokens"]),
            seconds=float(data.get("seconds", 0.0)),
            dropped_bytes=int(data.get("dropped_bytes", 0)),
            rows_dropped=int(data.get("rows_dropped", 0)),
            span_methods={str(k): int(v) for k, v in (data.get("span_methods") or {}).items()},
            rows_truncated=int(data.get("rows_truncated", 0)),
            # A progress.json from before this count existed: its committed rows were never checked.
            rows_with_control_tokens=data["rows_with_control_tokens"] if "rows_with_control_tokens" in data else None,
        )


def _fsync_dir(path: str) -> None:
    """Make a rename durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, data: Any) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one, never half."""
    tmp = os.path.join(os.path.dirname(path) or ".", "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _schema(policy: bool = False) -> Any:
    pa, _ = _pyarrow()
    columns = [
        ("row", pa.int64()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int64())),
    ]
    if policy:
        columns += [("message_index", pa.list_(pa.int32())), ("span_method", pa.string()), ("truncated", pa.int32())]
    columns += [("id", pa.string()), ("source_file", pa.string())]
    return pa.schema(columns)


def _config(opts: TokenizeOptions, inputs: Sequence[InputFile], tokenizer: LoadedTokenizer) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one."""
    return {
        "inputs": [{"path": os.path.abspath(f.path), "size": f.size} for f in inputs],
        "tokenizer_sha256": tokenizer.sha256,
        "mode": None if opts.policy is not None else opts.mode,
        "messages_field": opts.messages_field,
        "tools_field": opts.tools_field,
        "finish_reason_field": opts.finish_reason_field,
        # The whole policy (labelling and shaping, sanitize_control_tokens included); None without one.
        "policy": None if opts.policy is None else opts.policy.to_dict(),
    }


def _start(out: str, config: dict[str, Any]) -> _State:
    """A new job: progress.json first (so any later kill is resumable), then an empty errors.jsonl
    (and dropped.jsonl under a policy)."""
    state = _State(config)
    write_json_atomic(os.path.join(out, PROGRESS), state.to_json())
    open(os.path.join(out, ERRORS), "wb").close()
    if config.get("policy") is not None:
        open(os.path.join(out, DROPPED), "wb").close()
    return state


def _prepare_outdir(opts: TokenizeOptions, config: dict[str, Any]) -> _State | None:
    """A fresh or reconciled state, or None when a resumed job is already complete."""
    out = opts.outdir
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"output {out!r} exists and is not a directory")
    os.makedirs(out, exist_ok=True)
    entries = os.listdir(out)
    if not opts.resume:
        if entries:
            what = "a finished job (manifest.json)" if MANIFEST in entries else (
                "an interrupted job (progress.json): add --resume to finish it" if PROGRESS in entries else "files"
            )
            raise UsageError(f"output directory {out!r} is not empty: it holds {what}; use an empty or new directory")
        return _start(out, config)
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
        return _start(out, config)
    state = _State.from_json(json.loads(Path(out, PROGRESS).read_text(encoding="utf-8")))
    differ = [k for k in config if state.config.get(k) != config[k]]
    if differ:
        raise UsageError(
            f"--resume: the job in {out!r} was started with different {', '.join(differ)}; "
            "rerun with the same inputs, tokenizer and options, or use a new directory"
        )
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
        with open(path, "r+b" if os.path.exists(path) else "wb") as f:
            f.truncate(committed_bytes)
    return state


class _Progress:
    """A one-line display on stderr (TTY only, ~5 updates/s); silent otherwise."""

    def __init__(self, enabled: bool, counter: _Counter) -> None:
        self.enabled = enabled
        self.counter = counter
        self.started = time.perf_counter()
        self.last = 0.0
        self.width = 0

    def update(self, rows: int, tokens: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        fraction = self.counter.fraction()
        eta = ""
        if 0 < fraction < 1:
            eta = f", ETA {_duration(elapsed * (1 - fraction) / fraction)} ({fraction:.0%})"
        line = f"chatmask: {rows:,} rows, {rows / elapsed:,.0f} rows/s, {tokens / elapsed:,.0f} tokens/s{eta}"
        sys.stderr.write("\r" + line + "\033[K")
        sys.stderr.flush()
        self.width = len(line)

    def close(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class _Job:
    """The streaming loop: one batch at a time, parts, errors and dropped rows committed in row order."""

    def __init__(self, opts: TokenizeOptions, tokenizer: LoadedTokenizer, inputs: list[InputFile], state: _State):
        self.opts = opts
        self.policy = opts.policy
        self.tok = tokenizer.tok
        self.inputs = inputs
        self.state = state
        self.out = opts.outdir
        self.pa, self.pq = _pyarrow()
        import pyarrow.compute as pc

        self.pc = pc
        self.schema = _schema(self.policy is not None)
        self.errors_file = open(os.path.join(self.out, ERRORS), "ab")
        self.dropped_file = open(os.path.join(self.out, DROPPED), "ab") if self.policy is not None else None
        # The part in progress: its writer, and its counts (not yet in `state`).
        self.writer: Any = None
        self.part_rows = 0
        self.part_tokens = 0
        self.part_trained = 0
        self.part_control: int | None = 0  # None: some of the part's rows went unchecked
        self.part_truncated = 0
        self.part_methods: dict[str, int] = {}
        self.pending_failed = 0  # error rows written after the last commit
        self.pending_dropped = 0  # dropped rows written after the last commit
        self.run_started = time.perf_counter()
        self.seconds_before = state.seconds

    # -- part and commit ------------------------------------------------------------------

    def _tmp_path(self) -> str:
        return os.path.join(self.out, "." + _part_name(len(self.state.parts)) + ".tmp")

    def _write_rows(self, table: Any, control: np.ndarray | None) -> None:
        """Append `table` to the part in progress; `control` flags its rows with control-token text."""
        if table.num_rows == 0:
            return
        if self.writer is None:
            self.writer = self.pq.ParquetWriter(self._tmp_path(), self.schema)
        self.writer.write_table(table)
        self.part_rows += table.num_rows
        self.part_tokens += int(self.pc.sum(self.pc.list_value_length(table.column("input_ids"))).as_py() or 0)
        trained = self.pc.not_equal(self.pc.list_flatten(table.column("labels")), -100)
        self.part_trained += int(self.pc.sum(trained).as_py() or 0)
        if control is None:
            self.part_control = None
        elif self.part_control is not None:
            self.part_control += int(np.count_nonzero(control))
        if self.policy is not None:
            for method in table.column("span_method").to_pylist():
                self.part_methods[method] = self.part_methods.get(method, 0) + 1
            self.part_truncated += int(self.pc.sum(self.pc.greater(table.column("truncated"), 0)).as_py() or 0)

    def _write_errors(self, errors: Sequence[tuple[int, str, int]]) -> None:
        """Append (row, message, source index) lines in row order; flushed, fsynced only at a commit."""
        if not errors:
            return
        names = self.inputs
        lines = [
            json.dumps({"row": row, "error": msg, "source_file": names[src].name}) + "\n" for row, msg, src in errors
        ]
        self.errors_file.write("".join(lines).encode("utf-8"))
        self.errors_file.flush()
        self.pending_failed += len(errors)

    def _write_dropped(self, dropped: Sequence[tuple[int, int, str | None]]) -> None:
        """Append (row, source index, id) lines to dropped.jsonl in row order, as `_write_errors` does."""
        if not dropped:
            return
        assert self.dropped_file is not None, "only a policy drops rows"
        names = self.inputs
        lines = [
            json.dumps({"row": row, "id": row_id, "reason": DROP_REASON, "source_file": names[src].name}) + "\n"
            for row, src, row_id in dropped
        ]
        self.dropped_file.write("".join(lines).encode("utf-8"))
        self.dropped_file.flush()
        self.pending_dropped += len(dropped)

    def _commit(self, next_row: int) -> None:
        """Errors and dropped rows fsynced, then the part renamed, then progress.json replaced
        (see the module docstring)."""
        self.errors_file.flush()
        os.fsync(self.errors_file.fileno())
        if self.dropped_file is not None:
            self.dropped_file.flush()
            os.fsync(self.dropped_file.fileno())
        state = self.state
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            tmp = self._tmp_path()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            name = _part_name(len(state.parts))
            os.replace(tmp, os.path.join(self.out, name))
            state.parts.append(
                {"file": name, "rows": self.part_rows, "tokens": self.part_tokens, "trained_tokens": self.part_trained}
            )
            state.rows_out += self.part_rows
            state.tokens += self.part_tokens
            state.trained_tokens += self.part_trained
            if state.rows_with_control_tokens is not None:
                state.rows_with_control_tokens = (
                    None if self.part_control is None else state.rows_with_control_tokens + self.part_control
                )
            state.rows_truncated += self.part_truncated
            for method, count in self.part_methods.items():
                state.span_methods[method] = state.span_methods.get(method, 0) + count
        state.rows_failed += self.pending_failed
        state.errors_bytes = self.errors_file.tell()
        if self.dropped_file is not None:
            state.rows_dropped += self.pending_dropped
            state.dropped_bytes = self.dropped_file.tell()
        state.next_row = next_row
        state.seconds = self.seconds_before + time.perf_counter() - self.run_started
        self.part_rows = self.part_tokens = self.part_trained = self.pending_failed = self.pending_dropped = 0
        self.part_control, self.part_truncated, self.part_methods = 0, 0, {}
        write_json_atomic(os.path.join(self.out, PROGRESS), state.to_json())

    # -- batches --------------------------------------------------------------------------

    def _call(self, rows: list[Any], finish: list[str | None] | str) -> Any:
        if self.policy is not None:
            return self.tok.tokenize_batch(rows, policy=self.policy, num_threads=self.opts.threads, on_error="skip")
        return self.tok.tokenize_batch(
            rows, mode=self.opts.mode, finish_reason=finish, num_threads=self.opts.threads, on_error="skip"
        )

    def _message(self, message: str) -> str:
        # The policy's row shaping names the row by its index in the batch call: not the input row.
        return _BATCH_ROW_PREFIX.sub("", message, count=1) if self.policy is not None else message

    def _tokenize(self, good: list[ParsedRow]) -> tuple[Any, list[tuple[int, str]], list[int]]:
        """`tokenize_batch` on the good rows: (batch, errors, dropped), indices into `good`; if the
        batch call itself fails, row by row."""
        finish: list[str | None] | str = [r.finish_reason or "" for r in good] if self.opts.finish_reason_field else ""
        rows = [r.conversation for r in good]
        try:
            batch = self._call(rows, finish)
            return batch, [(i, self._message(msg)) for i, msg in batch.errors], [int(i) for i in batch.dropped]
        except Exception:  # noqa: BLE001 - isolate the row that broke the batch; never lose the rest
            pass
        tables, errors, kept, dropped = [], [], [], []
        for i, row in enumerate(rows):
            try:
                one = self._call([row], finish if isinstance(finish, str) else [finish[i]])
            except Exception as e:  # noqa: BLE001
                errors.append((i, f"{type(e).__name__}: {e}"))
                continue
            errors.extend((i, self._message(msg)) for _, msg in one.errors)
            if one.dropped:
                dropped.append(i)
            if len(one):
                tables.append(one)
                kept.append(i)
        return _merge_batches(tables, kept, self.policy is not None), errors, dropped

    def process(self, batch_rows: list[RawRow]) -> None:
        opts = self.opts
        pa = self.pa
        if self.policy is not None:
            parsed = [parse_policy_row(r.payload, self.policy) for r in batch_rows]  # type: ignore[arg-type]
        else:
            parsed = [
                parse_row(r.payload, opts.messages_field, opts.tools_field, opts.finish_reason_field)  # type: ignore[arg-type]
                for r in batch_rows
            ]
        errors: list[tuple[int, str, int]] = []
        dropped: list[tuple[int, int, str | None]] = []
        good_idx = []
        for i, p in enumerate(parsed):
            if p.error is not None:
                errors.append((batch_rows[i].row, p.error, batch_rows[i].source))
            else:
                good_idx.append(i)
        table = None
        control = None
        if good_idx:
            batch, batch_errors, batch_dropped = self._tokenize([parsed[i] for i in good_idx])
            for local, msg in batch_errors:
                i = good_idx[local]
                errors.append((batch_rows[i].row, msg, batch_rows[i].source))
            for local in batch_dropped:
                i = good_idx[local]
                dropped.append((batch_rows[i].row, batch_rows[i].source, parsed[i].id))
            if len(batch):
                idx = [good_idx[int(j)] for j in batch.rows]
                arrow = batch.to_arrow()
                columns = {
                    "row": pa.array([batch_rows[i].row for i in idx], pa.int64()),
                    "input_ids": arrow.column("input_ids"),
                    "labels": arrow.column("labels"),
                }
                if self.policy is not None:
                    columns["message_index"] = pa.ListArray.from_arrays(
                        pa.array(batch.offsets.astype(np.int32, copy=False)), pa.array(batch.message_index)
                    )
                    columns["span_method"] = pa.array(batch.span_methods, pa.string())
                    columns["truncated"] = pa.array(np.asarray(batch.truncated)).cast(pa.int32())
                columns["id"] = pa.array([parsed[i].id for i in idx], pa.string())
                columns["source_file"] = pa.array([self.inputs[batch_rows[i].source].name for i in idx], pa.string())
                table = pa.table(columns).cast(self.schema)
                if batch.control_rows is not None:
                    control = np.asarray(batch.control_rows, dtype=bool)
        errors.sort()
        dropped.sort()
        self._place(table, control, errors, dropped, batch_rows[-1].row + 1)

    def _place(
        self,
        table: Any,
        control: np.ndarray | None,
        errors: list[tuple[int, str, int]],
        dropped: list[tuple[int, int, str | None]],
        batch_end: int,
    ) -> None:
        """Put a batch's rows into parts, committing each part as it fills (split mid-batch if needed)."""
        per_file = self.opts.rows_per_file
        while table is not None and table.num_rows > 0:
            need = per_file - self.part_rows
            if table.num_rows < need:
                self._write_rows(table, control)
                break
            head = table.slice(0, need)
            last = int(head.column("row")[need - 1].as_py())
            self._write_rows(head, None if control is None else control[:need])
            self._write_errors([e for e in errors if e[0] <= last])
            errors = [e for e in errors if e[0] > last]
            self._write_dropped([d for d in dropped if d[0] <= last])
            dropped = [d for d in dropped if d[0] > last]
            self._commit(last + 1)
            table = table.slice(need)
            control = None if control is None else control[need:]
        self._write_errors(errors)
        self._write_dropped(dropped)
        if self.writer is None and batch_end > self.state.next_row:
            self._commit(batch_end)  # nothing in progress: make the batch's errors durable too

    def finish(self, rows_in: int) -> None:
        if self.writer is not None or rows_in > self.state.next_row or self.pending_failed or self.pending_dropped:
            self._commit(rows_in)
        self._close_files()

    def abort(self) -> None:
        """Leave the directory as a kill would (resume reconciles it); just release the files."""
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
        self._close_files()

    def _close_files(self) -> None:
        self.errors_file.close()
        if self.dropped_file is not None:
            self.dropped_file.close()


_BATCH_ROW_PREFIX = re.compile(r"^(?:row \d+: )+")


def _merge_batches(batches: list[Any], kept: list[int], policy: bool = False) -> Any:
    """Single-row TokenizedBatches glued into one (only for the row-by-row fallback)."""
    from .batch import TokenizedBatch

    def cat(name: str, dtype: Any) -> np.ndarray:
        return np.concatenate([getattr(b, name) for b in batches]) if batches else np.zeros(0, dtype)

    ids = cat("input_ids", np.int32)
    labels = cat("labels", np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(b.input_ids) for b in batches], dtype=np.int64)]).astype(np.int64)
    loffsets = np.concatenate([[0], np.cumsum([len(b.labels) for b in batches], dtype=np.int64)]).astype(np.int64)
    control = cat("control_rows", bool) if all(b.control_rows is not None for b in batches) else None
    extra: dict[str, Any] = {}
    if policy:
        extra = {
            "message_index": cat("message_index", np.int32),
            "span_methods": [m for b in batches for m in b.span_methods],
            "straddling": cat("straddling", np.uint32),
            "positions_derived": cat("positions_derived", bool),
            "truncated": cat("truncated", np.uint32),
        }
    return TokenizedBatch(ids, labels, offsets, loffsets, np.array(kept, np.int64), [], control_rows=control, **extra)


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


def verify_output(outdir: str, rows_in: int, parts: Sequence[Mapping[str, Any]]) -> None:
    """Check that every input row is in exactly one part, in errors.jsonl or in dropped.jsonl
    (streaming, sorted merge).

    Parts hold increasing row numbers and errors.jsonl / dropped.jsonl are in row order, so
    strictly increasing sequences that are disjoint and add up to `rows_in` in-range rows are
    exactly ``range(rows_in)``.
    """
    _, pq = _pyarrow()
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
        rows = pq.read_table(os.path.join(outdir, part["file"]), columns=["row"]).column("row").to_numpy()
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


def run_tokenize(opts: TokenizeOptions) -> dict[str, Any]:
    """The whole `chatmask tokenize` job; returns the manifest. Raises UsageError for bad usage."""
    opts = _resolve_options(opts)
    policy = opts.policy
    if opts.rows_per_file < 1 or opts.batch_rows < 1:
        raise UsageError("--rows-per-file and --batch-rows must be positive")
    if opts.threads is not None and opts.threads < 1:
        raise UsageError("--threads must be positive")
    _pyarrow()
    inputs = resolve_inputs(opts.inputs)
    tokenizer = load_tokenizer(opts.tokenizer)
    config = _config(opts, inputs, tokenizer)
    state = _prepare_outdir(opts, config)
    if state is None:
        manifest = json.loads(Path(opts.outdir, MANIFEST).read_text(encoding="utf-8"))
        if not opts.quiet:
            print(f"chatmask tokenize: {opts.outdir} is already complete (manifest.json); nothing to do", file=sys.stderr)
        return manifest
    job = _Job(opts, tokenizer, inputs, state)
    counter = _Counter(inputs)
    progress = _Progress(sys.stderr.isatty() and not opts.quiet, counter)
    if policy is not None:
        fields = _policy_fields(policy)
    else:
        fields = _fields(opts.messages_field, opts.tools_field, opts.finish_reason_field)  # type: ignore[arg-type]
    rows_in = 0
    done_rows = 0
    done_tokens = 0
    try:
        pending: list[RawRow] = []
        for raw in iter_raw_rows(inputs, fields, opts.batch_rows, state.next_row, counter):
            rows_in = raw.row + 1
            if raw.row < state.next_row:
                continue
            pending.append(raw)
            if len(pending) >= opts.batch_rows:
                tokens_before = state.tokens + job.part_tokens
                job.process(pending)
                done_rows += len(pending)
                done_tokens += state.tokens + job.part_tokens - tokens_before
                pending = []
                progress.update(done_rows, done_tokens)
        if pending:
            job.process(pending)
            done_rows += len(pending)
        if rows_in < state.next_row:
            raise UsageError(f"--resume: the inputs hold {rows_in} rows but {state.next_row} were already done")
        job.finish(rows_in)
    except BaseException:
        progress.close()
        job.abort()
        raise
    progress.close()
    verify_output(opts.outdir, rows_in, state.parts)
    rows_dropped = state.rows_dropped
    assert rows_in == state.rows_out + state.rows_failed + rows_dropped, (
        rows_in,
        state.rows_out,
        state.rows_failed,
        rows_dropped,
    )
    from . import __version__

    sanitize = policy is not None and policy.sanitize_control_tokens
    manifest = {
        "complete": True,
        "rows_in": rows_in,
        "rows_out": state.rows_out,
        "rows_failed": state.rows_failed,
        "rows_dropped": rows_dropped,
        "tokens": state.tokens,
        "trained_tokens": state.trained_tokens,
        "seconds": round(state.seconds, 3),
        "tokenizer": tokenizer.name,
        "tokenizer_sha256": tokenizer.sha256,
        "mode": None if policy is not None else opts.mode,
        "messages_field": opts.messages_field,
        "tools_field": opts.tools_field,
        "finish_reason_field": opts.finish_reason_field,
        "policy": None if policy is None else policy.to_dict(),
        "span_methods": None if policy is None else dict(sorted(state.span_methods.items())),
        "rows_truncated": None if policy is None else state.rows_truncated,
        "rows_with_control_tokens": state.rows_with_control_tokens,
        "sanitize_control_tokens": sanitize,
        "chatmask_version": __version__,
        "inputs": [f.path for f in inputs],
        "parts": [{"file": p["file"], "rows": p["rows"]} for p in state.parts],
        "errors_file": ERRORS,
        "dropped_file": None if policy is None else DROPPED,
    }
    write_json_atomic(os.path.join(opts.outdir, MANIFEST), manifest)
    os.remove(os.path.join(opts.outdir, PROGRESS))
    if not opts.quiet:
        dropped = f", {rows_dropped:,} dropped ({DROPPED})" if policy is not None else ""
        if state.rows_with_control_tokens is None:
            control = "control tokens in inputs not checked (Jinja2 template path)"
        else:
            how = "encoded as text" if sanitize else "encoded as control tokens"
            control = f"{state.rows_with_control_tokens:,} row(s) with control-token text ({how})"
        print(
            f"chatmask tokenize: {rows_in:,} rows in -> {state.rows_out:,} out in {len(state.parts)} part(s), "
            f"{state.rows_failed:,} failed ({ERRORS}){dropped}; {state.tokens:,} tokens "
            f"({state.trained_tokens:,} trained); {control}; {state.seconds:.2f} s -> {opts.outdir}",
            file=sys.stderr,
        )
    return manifest


# --------------------------------------------------------------------------------------------
# show
# --------------------------------------------------------------------------------------------

GREEN, DIM, REVERSE, RESET = "\033[32m", "\033[2m", "\033[7m", "\033[0m"
_CONTROL = re.compile(
    r"^(<\|[^|\s]*\|>|<｜[^｜]*｜>|\[/?[A-Z][A-Z_]+\]|</?s>|<(?:bos|eos|pad|unk|mask|start_of_turn|end_of_turn)>)$"
)
_TURN_START = re.compile(r"start|\[INST\]|^<\|(?:user|assistant|system|tool)\|>$", re.IGNORECASE)


def special_token_texts(tok: ChatTokenizer, tokenizer_json: str | None = None) -> set[str]:
    """Texts of the special tokens: the named ones plus added tokens flagged special in tokenizer.json."""
    texts: set[str] = set()
    for value in tok.special_tokens.values():
        if isinstance(value, str):
            texts.add(value)
        elif isinstance(value, (list, tuple)):
            texts.update(v for v in value if isinstance(v, str))
    if tokenizer_json:
        try:
            added = json.loads(tokenizer_json).get("added_tokens") or []
        except ValueError:
            added = []
        texts.update(t["content"] for t in added if isinstance(t, dict) and t.get("special") and "content" in t)
    return texts


def is_special(piece: str, specials: set[str]) -> bool:
    return piece in specials or bool(_CONTROL.match(piece))


def render_mask(
    pieces: Sequence[str], labels: Sequence[int], color: bool, specials: set[str] | None = None
) -> str:
    """Each token's text; trained green (else in [[...]] spans), masked dim, specials reversed (else ⟦...⟧).

    Newlines print as ``↵`` plus a real newline. Without colour a ``[[`` span closes before each
    newline and reopens after it, so every printed line reads on its own.
    """
    specials = specials if specials is not None else set()
    out: list[str] = []
    in_span = False
    for piece, label in zip(pieces, labels):
        trained = label != -100
        special = is_special(piece, specials)
        text = piece.replace("\r", "␍")
        if color:
            style = (GREEN if trained else DIM) + (REVERSE if special else "")
            lines = text.split("\n")
            shown = [line + "↵" for line in lines[:-1]] + [lines[-1]]
            out.append("\n".join(f"{style}{line}{RESET}" if line else "" for line in shown))
            continue
        if special:
            text = f"⟦{text}⟧"
        lines = text.split("\n")
        for i, line in enumerate(lines):
            last = i == len(lines) - 1
            content = line if last else line + "↵"
            if content:
                if trained and not in_span:
                    out.append("[[")
                    in_span = True
                elif not trained and in_span:
                    out.append("]]")
                    in_span = False
                out.append(content)
            if not last:
                if in_span:
                    out.append("]]")
                    in_span = False
                out.append("\n")
    if in_span:
        out.append("]]")
    return "".join(out)


def display_pieces(tok: ChatTokenizer, ids: Sequence[int]) -> list[str]:
    """One string per token, with a character split over several byte-level tokens shown whole.

    Decoding such tokens one at a time gives U+FFFD halves; the joint decode of up to four tokens
    is put on the first and the others show as empty, so every token keeps its own label.
    """
    pieces = list(tok._core.decode(list(ids), per_token=True))
    i = 0
    while i < len(pieces):
        if "\ufffd" in pieces[i]:
            for j in range(i + 2, min(i + 5, len(pieces) + 1)):
                joint = tok._core.decode(list(ids[i:j]))
                if "\ufffd" not in joint:
                    pieces[i : j] = [joint] + [""] * (j - i - 1)
                    i = j - 1
                    break
        i += 1
    return pieces


def legend(color: bool) -> str:
    if color:
        return (
            f"legend: {GREEN}trained{RESET}  {DIM}masked (-100){RESET}  "
            f"{REVERSE}special{RESET}  ↵ newline"
        )
    return "legend: [[trained]]  masked (-100) unmarked  ⟦special⟧  ↵ newline"


_HTML_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px; }
.turn { white-space: pre-wrap; border-left: 3px solid #ccc; padding: 4px 8px; margin: 6px 0; }
.tok { border-right: 1px solid rgba(0,0,0,0.12); }
.trained { background: #c8f7c5; color: #064; }
.masked { color: #999; }
.special { outline: 1px solid #555; border-radius: 3px; font-weight: bold; }
.nl { color: #bbb; }
.legend span { padding: 0 6px; margin-right: 8px; }
"""


def render_html(
    pieces: Sequence[str],
    ids: Sequence[int],
    labels: Sequence[int],
    specials: set[str],
    title: str,
) -> str:
    """A self-contained page: one span per token (hover: id and label), a block per turn, legend, counts."""
    blocks: list[list[str]] = [[]]
    for piece, token_id, label in zip(pieces, ids, labels):
        special = is_special(piece, specials)
        if special and _TURN_START.search(piece) and blocks[-1]:
            blocks.append([])
        classes = ["tok", "trained" if label != -100 else "masked"] + (["special"] if special else [])
        text = html.escape(piece).replace("\n", '<span class="nl">↵</span>\n')
        blocks[-1].append(
            f'<span class="{" ".join(classes)}" title="id {int(token_id)}, label {int(label)}">{text}</span>'
        )
    trained = sum(1 for label in labels if label != -100)
    body = "\n".join(f'<div class="turn">{"".join(b)}</div>' for b in blocks if b)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_HTML_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="legend">Legend: <span class="trained">trained</span><span class="masked">masked (-100)</span><span class="special">special token</span><span class="nl">↵</span> newline; hover a token for its id and label; a new block starts at each turn-opening special token.</p>
<p class="counts">{len(ids)} tokens, {trained} trained</p>
<div class="tokens">
{body}
</div>
</body>
</html>
"""


@dataclass
class ShowOptions:
    tokenizer: str
    input: str | None = None
    row: int = 0
    demo_row: int | None = None
    mode: str = "last"
    html: str | None = None
    no_color: bool = False
    messages_field: str = "messages"
    tools_field: str = "tools"
    finish_reason_field: str | None = None


def _read_row(opts: ShowOptions) -> tuple[ParsedRow, str]:
    """The requested row, parsed, and a label saying where it came from."""
    if opts.input is None:
        from .demo import demo_conversations

        rows = demo_conversations()
        n = opts.demo_row if opts.demo_row is not None else 0
        if not 0 <= n < len(rows):
            raise UsageError(f"--demo-row {n} out of range: the demo has {len(rows)} conversations")
        payload = json.dumps(rows[n]).encode()
        return parse_row(payload, opts.messages_field, opts.tools_field, opts.finish_reason_field), f"demo row {n}"
    if opts.row < 0:
        raise UsageError("--row must be >= 0")
    inputs = resolve_inputs([opts.input])
    fields = _fields(opts.messages_field, opts.tools_field, opts.finish_reason_field)
    for raw in iter_raw_rows(inputs, fields, 1024, skip=opts.row):
        if raw.row == opts.row:
            assert raw.payload is not None
            parsed = parse_row(raw.payload, opts.messages_field, opts.tools_field, opts.finish_reason_field)
            return parsed, f"{inputs[raw.source].name} row {opts.row}"
    raise UsageError(f"--row {opts.row} out of range for {opts.input!r}")


def run_show(opts: ShowOptions, out: IO[str] | None = None) -> int:
    """Print one row's tokens with their mask; exit code 1 when the row cannot be tokenized."""
    out = out if out is not None else sys.stdout
    if opts.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    tokenizer = load_tokenizer(opts.tokenizer)
    parsed, where = _read_row(opts)
    if parsed.error is not None:
        print(f"{where}: cannot be tokenized: {parsed.error}", file=sys.stderr)
        return 1
    tok = tokenizer.tok
    batch = tok.tokenize_batch(
        [parsed.conversation], mode=opts.mode, finish_reason=parsed.finish_reason or "", on_error="skip"
    )
    if batch.errors:
        print(f"{where}: cannot be tokenized: {batch.errors[0][1]}", file=sys.stderr)
        return 1
    ids = batch[0]["input_ids"].tolist()
    labels = batch[0]["labels"].tolist()
    pieces = display_pieces(tok, ids)
    # Labels can outnumber tokens (see TokenizedBatch); show the ids' labels, count all.
    specials = special_token_texts(tok, tokenizer.tokenizer_json)
    color = not opts.no_color and out.isatty()
    trained = sum(1 for label in labels if label != -100)
    id_part = f" (id {parsed.id})" if parsed.id else ""
    header = f"{where}{id_part}, mode={opts.mode}: {len(ids)} tokens, {trained} trained"
    print(header, file=out)
    print(legend(color), file=out)
    print(render_mask(pieces, labels[: len(ids)], color, specials), file=out)
    if opts.html:
        page = render_html(pieces, ids, labels[: len(ids)], specials, f"chatmask show: {header}")
        Path(opts.html).write_text(page, encoding="utf-8")
        print(f"wrote {opts.html}", file=out)
    return 0
