"""Readers and sinks of the corpus pipeline (see :mod:`chatmask.io.readers`, :mod:`chatmask.io.sinks`)."""

from .readers import (
    JSONL_SUFFIXES,
    PARQUET_SUFFIX,
    InputFile,
    InputReadError,
    RawRow,
    ReadProgress,
    iter_raw_rows,
    jsonl_lines,
    parquet_rows,
    pyarrow_modules,
    resolve_inputs,
)
from .sinks import DROPPED, ERRORS, MANIFEST, PROGRESS, PartWriter, SideFile, part_name, write_json_atomic

__all__ = [
    "DROPPED",
    "ERRORS",
    "JSONL_SUFFIXES",
    "MANIFEST",
    "PARQUET_SUFFIX",
    "PROGRESS",
    "InputFile",
    "InputReadError",
    "PartWriter",
    "RawRow",
    "ReadProgress",
    "SideFile",
    "iter_raw_rows",
    "jsonl_lines",
    "parquet_rows",
    "part_name",
    "pyarrow_modules",
    "resolve_inputs",
    "write_json_atomic",
]
