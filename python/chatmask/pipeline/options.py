"""The options of ``chatmask tokenize`` and ``chatmask show``, each declared once.

Every option is a dataclass field whose metadata carries its command-line flag and help text;
:func:`add_arguments` builds the argparse arguments from them and appends the default to the
help, so a default lives in exactly one place. Options whose default depends on ``--policy``
(``--mode``, ``--messages-field``, ``--tools-field``) default to None and name their value
without a policy in ``resolved``: :func:`resolve_tokenize` fills it in, and the help says it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._tokenizer import ENCODERS, MODES
from .._usage import UsageError
from ..policy import MaskPolicy
from ..rows import type_name


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {value}")
    return value


def option(default: Any, *flags: str, help: str, resolved: Any = None, **argparse_kwargs: Any) -> Any:
    """A dataclass field that is also a command-line option (`flags` empty: positional/not on the CLI)."""
    meta = {"flags": flags, "help": help, "resolved": resolved, "argparse": argparse_kwargs}
    return field(default=default, metadata=meta)


def _help(f: dataclasses.Field) -> str:
    meta = f.metadata
    text = meta["help"]
    shown = meta["resolved"] if meta["resolved"] is not None else f.default
    if meta["argparse"].get("action") in ("store_true",) or shown in (None, dataclasses.MISSING):
        return text
    return f"{text} (default: {shown})"


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Argparse arguments for the option fields of `cls` (in declaration order)."""
    for f in dataclasses.fields(cls):
        if "flags" not in f.metadata or not f.metadata["flags"] or f.name in skip:
            continue
        kwargs = dict(f.metadata["argparse"])
        flags = f.metadata["flags"]
        if flags[0].startswith("-"):
            kwargs.setdefault("dest", f.name)
        if f.default is not dataclasses.MISSING:
            kwargs.setdefault("default", f.default)
        parser.add_argument(*flags, help=_help(f), **kwargs)


def from_namespace(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An options object from parsed arguments (fields not on the command line keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def resolved_default(cls: type, name: str) -> Any:
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["resolved"]


DEFAULT_LABELS = "MaskPolicy(): assistant turns and their end tokens"
TASKS = ("sft", "preference")


def default_policy(messages_field: str | None, tools_field: str | None) -> MaskPolicy:
    """The labels without --mode or --policy: span-based, a default MaskPolicy on the given fields."""
    return MaskPolicy(field_messages=messages_field or "messages", field_tools=tools_field or "tools")


# Shared by tokenize and show.
def _tokenizer() -> Any:
    return option(
        dataclasses.MISSING,
        "--tokenizer",
        required=True,
        help="local tokenizer directory, or 'demo' (nothing is downloaded)",
    )


def _encoder() -> Any:
    return option(
        "auto",
        "--encoder",
        choices=ENCODERS,
        help="encoding engine: the fast exact one where the load-time gate shows it exact (auto), "
        "that one or an error (fast), or the tokenizers crate (tokenizers)",
    )


def _allow_jinja2() -> Any:
    return option(
        False,
        "--allow-jinja2",
        action="store_true",
        help="render a template minijinja cannot render exactly through Jinja2 (under the same limits) "
        "instead of refusing it",
    )


def _mode(policy_note: str) -> Any:
    return option(
        None,
        "--mode",
        choices=MODES,
        help="label with the reference's prefix-count arithmetic (rows where it is wrong are flagged); "
        f"default: span-based labels, {DEFAULT_LABELS}{policy_note}",
    )


def _messages_field(policy_note: str) -> Any:
    return option(
        None, "--messages-field", resolved="messages", help=f"field holding the list of messages{policy_note}"
    )


def _tools_field(policy_note: str) -> Any:
    return option(None, "--tools-field", resolved="tools", help=f"field holding the row's tools, if any{policy_note}")


def _finish_reason_field(policy_note: str) -> Any:
    return option(
        None, "--finish-reason-field", help=f"field holding the row's finish reason (e.g. 'length'){policy_note}"
    )


def _policy() -> Any:
    # On the command line a FILE (see load_policy); in the dataclass the MaskPolicy itself.
    return option(
        None,
        "--policy",
        metavar="FILE",
        help="label with a chatmask.MaskPolicy read from FILE (JSON object of its fields; unknown fields are errors)",
    )


@dataclass
class TokenizeOptions:
    """What `run_tokenize` does (see `chatmask tokenize --help`)."""

    inputs: list[str] = option(
        dataclasses.MISSING,
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files or directories (their *.jsonl[.gz|.zst], *.parquet)",
    )
    outdir: str = option(
        dataclasses.MISSING,
        "-o",
        "--out",
        required=True,
        metavar="OUTDIR",
        help="output directory (new or empty, or --resume)",
    )
    tokenizer: str = _tokenizer()
    encoder: str = _encoder()
    allow_jinja2: bool = _allow_jinja2()
    task: str = option(
        "sft",
        "--task",
        choices=TASKS,
        help="sft: one output row per conversation; preference: rows with prompt/chosen/rejected become DPO "
        "pairs (README 'Preference pairs')",
    )
    mode: str | None = _mode("; not with --policy")
    policy: MaskPolicy | None = _policy()
    sanitize_control_tokens: bool = option(
        False,
        "--sanitize-control-tokens",
        action="store_true",
        help="encode control-token text in the inputs (a user typing <|im_start|>) as text, as transformers 5 "
        "does; sets the policy's sanitize_control_tokens, so not with --mode",
    )
    threads: int | None = option(None, "--threads", type=positive, help="tokenizer threads (default: all cores)")
    messages_field: str | None = _messages_field("; with --policy, the policy's field_messages")
    tools_field: str | None = _tools_field("; with --policy, the policy's field_tools")
    finish_reason_field: str | None = _finish_reason_field("; not with --policy")
    rows_per_file: int = option(100_000, "--rows-per-file", type=positive, help="rows per part file")
    batch_rows: int = option(4096, "--batch-rows", type=positive, help="rows read and tokenized at a time")
    pack: int | None = option(
        None,
        "--pack",
        type=positive,
        metavar="MAX_LEN",
        help="write packs of at most MAX_LEN tokens instead of one row per conversation (docs/packing.md)",
    )
    pack_strategy: str = option(
        "bfd", "--pack-strategy", choices=("bfd", "ffd", "sequential"), help="how rows are packed (with --pack)"
    )
    pack_overflow: str = option(
        "split",
        "--pack-overflow",
        choices=("split", "truncate_left", "truncate_right"),
        help="rows longer than MAX_LEN: cut into pieces, or keep their last / first MAX_LEN tokens (with --pack)",
    )
    pad: bool = option(False, "--pad", action="store_true", help="pad every pack to MAX_LEN (with --pack)")
    pad_id: int = option(0, "--pad-id", type=int, help="token id of the padding (with --pad)")
    pack_window: int = option(
        20_000,
        "--pack-window",
        type=positive,
        help="input rows packed together (one part each; bounds memory, see docs/packing.md) (with --pack)",
    )
    resume: bool = option(False, "--resume", action="store_true", help="finish an interrupted job in OUTDIR")
    quiet: bool = option(False, "--quiet", action="store_true", help="no progress line and no summary")


@dataclass
class ShowOptions:
    """What `run_show` does (see `chatmask show --help`)."""

    tokenizer: str = _tokenizer()
    encoder: str = _encoder()
    allow_jinja2: bool = _allow_jinja2()
    input: str | None = option(
        None, "input", nargs="?", metavar="INPUT", help="JSONL or Parquet file (default: the demo conversations)"
    )
    row: int = option(0, "--row", type=int, help="row of INPUT to show (0-based)")
    demo_row: int | None = option(
        None, "--demo-row", type=int, help="show this demo conversation instead of an INPUT row"
    )
    mode: str | None = _mode("; not with --policy")
    policy: MaskPolicy | None = _policy()
    html: str | None = option(None, "--html", metavar="FILE", help="also write a self-contained HTML view to FILE")
    no_color: bool = option(
        False, "--no-color", action="store_true", help="mark trained spans with [[...]] instead of colour"
    )
    messages_field: str | None = _messages_field("")
    tools_field: str | None = _tools_field("")
    finish_reason_field: str | None = _finish_reason_field("")


def load_policy(path: str) -> MaskPolicy:
    """A :class:`MaskPolicy` from a JSON file of its fields; any problem is a UsageError naming the file.

    The policy validates itself (:meth:`MaskPolicy.from_dict`); only the JSON shape is checked here.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--policy {path!r}: cannot read it: {e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise UsageError(f"--policy {path!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"--policy {path!r} must hold a JSON object of MaskPolicy fields, not a JSON {type_name(data)}"
        )
    try:
        policy = MaskPolicy.from_dict(data)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--policy {path!r}: {e}") from None
    for name in ("field_messages", "field_tools", "field_system"):
        value = getattr(policy, name)
        if not isinstance(value, str) and not (name == "field_system" and value is None):
            raise UsageError(f"--policy {path!r}: {name} must be a string, not a JSON {type_name(value)}")
    return policy


def resolve_mode_fields(opts: Any) -> Any:
    """With --mode: `messages_field` and `tools_field` filled in from their declared ``resolved``
    defaults, the mode checked."""
    cls = type(opts)
    mode = opts.mode
    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}")
    return dataclasses.replace(
        opts,
        mode=mode,
        messages_field=opts.messages_field
        if opts.messages_field is not None
        else resolved_default(cls, "messages_field"),
        tools_field=opts.tools_field if opts.tools_field is not None else resolved_default(cls, "tools_field"),
    )


def with_default_policy(opts: Any) -> Any:
    """Neither --mode nor --policy: the default span-based policy on the given fields."""
    if opts.policy is not None or opts.mode is not None:
        return opts
    if opts.finish_reason_field is not None:
        raise UsageError(
            "--finish-reason-field needs --mode: the default labels are span-based "
            f"({DEFAULT_LABELS}) and take no finish reason"
        )
    policy = default_policy(opts.messages_field, opts.tools_field)
    return dataclasses.replace(opts, policy=policy, messages_field=None, tools_field=None)


def resolve_tokenize(opts: TokenizeOptions) -> TokenizeOptions:
    """The options with their defaults filled in and the policy settled; UsageError on a conflict."""
    if opts.policy is not None and not isinstance(opts.policy, MaskPolicy):
        raise UsageError(f"policy must be a chatmask.MaskPolicy, not {type(opts.policy).__name__}")
    if opts.rows_per_file < 1 or opts.batch_rows < 1:
        raise UsageError("--rows-per-file and --batch-rows must be positive")
    if opts.threads is not None and opts.threads < 1:
        raise UsageError("--threads must be positive")
    if opts.pack is None:
        lone = [flag for flag, on in (("--pad", opts.pad), ("--pack-strategy", opts.pack_strategy != "bfd"),
                                      ("--pack-overflow", opts.pack_overflow != "split")) if on]  # fmt: skip
        if lone:
            raise UsageError(f"{', '.join(lone)} needs --pack MAX_LEN")
    elif opts.pack < 1 or opts.pack_window < 1:
        raise UsageError("--pack and --pack-window must be positive")
    if opts.task == "preference":
        return resolve_preference(opts)
    opts = with_default_policy(opts)
    if opts.policy is None:
        if opts.sanitize_control_tokens:
            raise UsageError(
                "--sanitize-control-tokens needs span-based labels (the default, or --policy), not --mode: it sets "
                "the policy's sanitize_control_tokens; the reference modes encode control-token text as the "
                "tokens, as transformers 4 does"
            )
        return resolve_mode_fields(opts)
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


def resolve_preference(opts: TokenizeOptions) -> TokenizeOptions:
    """``--task preference``: the policy (default ``PREFERENCE_POLICY`` on ``--tools-field``)
    settled; the SFT-only options refused."""
    from ..preference import PREFERENCE_POLICY

    given = [
        flag
        for flag, value in (
            ("--mode", opts.mode),
            ("--pack", opts.pack),
            ("--finish-reason-field", opts.finish_reason_field),
            ("--messages-field", opts.messages_field),
            ("--tools-field", opts.tools_field if opts.policy is not None else None),
        )
        if value is not None
    ]
    if given:
        raise UsageError(
            f"{', '.join(given)} cannot be combined with --task preference: pairs are labelled by a MaskPolicy "
            "(default PREFERENCE_POLICY, or --policy), read from prompt/chosen/rejected, and not packed"
        )
    policy = opts.policy or dataclasses.replace(PREFERENCE_POLICY, field_tools=opts.tools_field or "tools")
    if opts.sanitize_control_tokens and not policy.sanitize_control_tokens:
        policy = dataclasses.replace(policy, sanitize_control_tokens=True)
    return dataclasses.replace(opts, policy=policy, messages_field=None, tools_field=policy.field_tools)
