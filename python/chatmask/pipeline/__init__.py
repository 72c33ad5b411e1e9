"""The offline corpus pipeline behind ``chatmask tokenize``: no input row is ever lost or
duplicated, even when the process is killed at any moment and rerun with ``--resume``.

Rooms: :mod:`chatmask.io` (readers and sinks), :mod:`chatmask.rows` (the one row parser and
null rule), and here :mod:`~.options` (every option declared once), :mod:`~.tokenizer` (loading
and the resume fingerprint), :mod:`~.state` (the commit/resume protocol and the final check),
:mod:`~.stages` (parse, tokenize: what runs on each batch) and :mod:`~.job` (the loop, the
manifest). ``chatmask show`` lives in :mod:`chatmask.show`.
"""

from .._usage import UsageError
from ..rows import ParsedRow, parse_policy_row, parse_row
from .job import Job, run_tokenize
from .options import ShowOptions, TokenizeOptions, load_policy
from .state import State, verify_output
from .tokenizer import LoadedTokenizer, load_tokenizer

__all__ = [
    "Job",
    "LoadedTokenizer",
    "ParsedRow",
    "ShowOptions",
    "State",
    "TokenizeOptions",
    "UsageError",
    "load_policy",
    "load_tokenizer",
    "parse_policy_row",
    "parse_row",
    "run_tokenize",
    "verify_output",
]
