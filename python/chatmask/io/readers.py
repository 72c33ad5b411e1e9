"""Input files: JSONL (plain, ``.gz``, ``.zst``), Parquet and directories of them, read as rows.

* **Row numbers.** The global row number is the 0-based position across all inputs, in the order
  given (a directory contributes its ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` and
  ``*.parquet`` files, sorted by name).
* **JSONL lines** are split on ``b"\\n"`` only, on bytes (``str.splitlines`` would also break on
  U+2028, U+0085, ``\\r`` inside JSON strings). A UTF-8 byte order mark at the very start of a
  file is ignored. The newline that ends the last line does not start a row; an empty line is a
  row (an error row later), so a JSONL row number is always its line number.
* **Parquet** rows are read column by column (only the columns asked for) and each value goes
  through the null rule of :mod:`chatmask.rows` by its Arrow type.
* **Broken input.** A truncated or corrupt ``.gz`` / ``.zst`` stream, a Parquet file whose footer
  or pages do not decode, or a file that cannot be opened raises :class:`InputReadError` naming
  the file and how far reading got. Rows before it have been handed out; the partial line a
  truncated stream ends with has not (it is not a row of the file). Both decompressors are
  checked for an unfinished stream at the end, so a truncation is never taken for the end.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import IO, Any, Iterator, Sequence

from .._usage import UsageError
from ..rows import read_column

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
READ_CHUNK = 1 << 20


class InputReadError(UsageError):
    """An input file stopped decoding (truncated, corrupt or unreadable) after `rows` of its rows.

    `file` is the path, `input_index` its place among the inputs, `row` the global row number
    reading stopped at, `bytes_read` how much of the file on disk had been consumed.
    """

    def __init__(self, file: str, input_index: int, rows: int, row: int, bytes_read: int | None, reason: str):
        self.file, self.input_index, self.rows, self.row, self.bytes_read, self.reason = (
            file,
            input_index,
            rows,
            row,
            bytes_read,
            reason,
        )
        where = f"after {rows:,} row(s)"
        if bytes_read is not None:
            where += f" ({bytes_read:,} of {_size(file):,} bytes read)"
        super().__init__(f"{file}: cannot read it {where}: {reason}")

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "input_index": self.input_index,
            "rows_read": self.rows,
            "row": self.row,
            "bytes_read": self.bytes_read,
            "reason": self.reason,
        }


class _Broken(Exception):
    """Raised inside a reader; `iter_raw_rows` adds where reading stood."""

    def __init__(self, reason: str, bytes_read: int | None) -> None:
        super().__init__(reason)
        self.reason, self.bytes_read = reason, bytes_read


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def pyarrow_modules() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UsageError("chatmask tokenize needs pyarrow to write Parquet: pip install pyarrow") from e
    return pa, pq


def _zstandard() -> Any:
    try:
        import zstandard
    except ImportError as e:
        raise UsageError("reading .zst input needs the zstandard module: pip install zstandard") from e
    return zstandard


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


class ReadProgress:
    """Where reading stands, for the progress display's ETA (fraction of total work done)."""

    def __init__(self, inputs: Sequence[InputFile]) -> None:
        self.sizes = [max(f.size, 1) for f in inputs]
        self.total = float(sum(self.sizes))
        self.file_index = 0
        self.file_fraction = 0.0

    def fraction(self) -> float:
        done = sum(self.sizes[: self.file_index]) + self.file_fraction * self.sizes[self.file_index]
        return min(done / self.total, 1.0) if self.total else 1.0


def _zstd_chunks(raw: IO[bytes]) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) zstd stream; an unfinished last frame is an error."""
    zstd = _zstandard()
    dctx = zstd.ZstdDecompressor()
    dobj = dctx.decompressobj()
    started = False  # the current frame has taken input
    while True:
        data = raw.read(READ_CHUNK)
        if not data:
            break
        while data:
            started = True
            try:
                out = dobj.decompress(data)
            except zstd.ZstdError as e:
                raise _Broken(f"corrupt zstd data: {e}", raw.tell()) from None
            if out:
                yield out
            if dobj.eof:
                data, dobj, started = dobj.unused_data, dctx.decompressobj(), False
            else:
                data = b""
    if started:
        raise _Broken("truncated zstd stream: the last frame is incomplete", raw.tell())


def _gzip_chunks(raw: IO[bytes]) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-member) gzip stream, as they come: a truncated stream
    yields everything before the cut, then fails (GzipFile would lose the last read)."""

    def member() -> Any:
        return zlib.decompressobj(16 + zlib.MAX_WBITS)

    dobj = member()
    started = False
    members = 0
    while True:
        try:
            data = raw.read(READ_CHUNK)
        except OSError as e:
            raise _Broken(f"read failed: {e}", raw.tell()) from None
        if not data:
            break
        while data:
            if members and not started and not data.strip(b"\0"):
                data = b""  # zero padding after the last member, which gzip accepts
                break
            started = True
            try:
                out = dobj.decompress(data)
            except zlib.error as e:
                raise _Broken(f"corrupt gzip data: {e}", raw.tell()) from None
            if out:
                yield out
            if dobj.eof:
                data, dobj, started = dobj.unused_data, member(), False
                members += 1
            else:
                data = b""
    if started:
        raise _Broken("truncated gzip stream (it ends before its end-of-stream marker)", raw.tell())


def _plain_chunks(raw: IO[bytes]) -> Iterator[bytes]:
    while True:
        try:
            chunk = raw.read(READ_CHUNK)
        except OSError as e:
            raise _Broken(f"read failed: {e}", raw.tell()) from None
        if not chunk:
            return
        yield chunk


def jsonl_lines(path: str, progress: ReadProgress | None = None) -> Iterator[bytes]:
    """A JSONL file's lines as bytes, split on b"\\n" only, streamed (see the module docstring)."""
    size = max(_size(path), 1)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise _Broken(f"cannot open it: {e.strerror or e}", 0) from None
    with raw:
        chunks = (
            _gzip_chunks(raw)
            if path.endswith(".gz")
            else _zstd_chunks(raw)
            if path.endswith(".zst")
            else _plain_chunks(raw)
        )
        parts: list[bytes] = []
        first = True
        decoded = 0  # bytes out of the decompressor so far
        consumed = 0  # bytes of the lines yielded so far
        for chunk in chunks:
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
            if progress is None:
                yield from pieces
                continue
            for line in pieces:
                consumed += len(line) + 1
                progress.file_fraction = consumed * scale
                yield line
        tail = b"".join(parts)
        if tail:
            yield tail  # a last line without its newline (only when the stream ended cleanly)


def parquet_rows(
    path: str, columns_wanted: Sequence[str], batch_rows: int, skip: int, progress: ReadProgress | None = None
) -> Iterator[dict[str, Any] | None]:
    """A Parquet file's rows (only the columns wanted, values read by their Arrow types), the
    first `skip` rows as None (the caller only counts them)."""
    pa, pq = pyarrow_modules()
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise _Broken(f"not a readable Parquet file: {e}", None) from None
    total = max(pf.metadata.num_rows, 1)
    schema = pf.schema_arrow
    columns = [c for c in dict.fromkeys(columns_wanted) if c in set(schema.names)]
    types = {c: schema.field(c).type for c in columns}
    done = 0
    if skip >= pf.metadata.num_rows:
        for _ in range(pf.metadata.num_rows):
            yield None
        return
    batches = pf.iter_batches(batch_size=batch_rows, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            raise _Broken(f"a row group does not decode: {e}", None) from None
        n = batch.num_rows
        if done + n <= skip:
            done += n
            for _ in range(n):
                yield None
            continue
        values = {c: read_column(batch.column(c).to_pylist(), types[c], True) for c in columns}
        for i in range(n):
            yield None if done + i < skip else {c: values[c][i] for c in columns}
        done += n
        if progress is not None:
            progress.file_fraction = done / total


@dataclass
class RawRow:
    """One input row before parsing: a JSONL line (bytes) or a Parquet row (a dict whose values
    the null rule has already read by type); None when skipped."""

    row: int
    source: int
    payload: bytes | dict[str, Any] | None

    @property
    def typed(self) -> bool:
        """A Parquet row: its values were read by their Arrow types (rows rule 2)."""
        return isinstance(self.payload, dict)


def iter_raw_rows(
    inputs: Sequence[InputFile],
    columns: Sequence[str],
    batch_rows: int,
    skip: int = 0,
    progress: ReadProgress | None = None,
) -> Iterator[RawRow]:
    """Every input row in global order; rows before `skip` come with payload None (not parsed).

    Raises :class:`InputReadError` when a file stops decoding; every row before it was yielded.
    """
    row = 0
    for index, f in enumerate(inputs):
        if progress is not None:
            progress.file_index, progress.file_fraction = index, 0.0
        start = row
        try:
            if f.kind == "parquet":
                for payload in parquet_rows(f.path, columns, batch_rows, max(skip - row, 0), progress):
                    yield RawRow(row, index, payload)
                    row += 1
            else:
                for line in jsonl_lines(f.path, progress):
                    yield RawRow(row, index, None if row < skip else line)
                    row += 1
        except _Broken as e:
            raise InputReadError(f.path, index, row - start, row, e.bytes_read, e.reason) from None
        if progress is not None:
            progress.file_fraction = 1.0
