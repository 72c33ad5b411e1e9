"""``chatmask show``: one conversation's tokens with their labels, in the terminal or as HTML.

The row is read exactly as ``chatmask tokenize`` reads it (:mod:`chatmask.io` readers and the
:mod:`chatmask.rows` parser, null rule included) and tokenized by the same batch call. Special
tokens come from the core's tables (:func:`~.tokens.special_token_texts`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Any

from .._usage import UsageError
from ..io.readers import iter_raw_rows, resolve_inputs
from ..pipeline.options import ShowOptions, resolve_mode_fields, with_default_policy
from ..pipeline.tokenizer import load_tokenizer
from ..policy import MaskPolicy
from ..rows import Fields, ParsedRow, parse
from ..truth import REFERENCE_MODES
from .html import render_html
from .terminal import legend, render_mask
from .tokens import display_pieces, is_special, special_token_texts

#: The span-based labels a reference mode is shown against: the CLI's default policy (assistant
#: turns and their end tokens).
SPAN_LABELS = MaskPolicy()

__all__ = [
    "ShowOptions",
    "display_pieces",
    "is_special",
    "legend",
    "render_html",
    "render_mask",
    "run_show",
    "special_token_texts",
]


def _read_row(opts: ShowOptions) -> tuple[ParsedRow, str]:
    """The requested row, parsed, and a label saying where it came from."""
    policy = opts.policy
    if policy is not None:
        fields = Fields.of_policy(policy)
    else:
        fields = Fields(opts.messages_field or "messages", opts.tools_field or "tools", opts.finish_reason_field)
    if opts.input is None:
        from ..demo import demo_conversations

        rows = demo_conversations()
        n = opts.demo_row if opts.demo_row is not None else 0
        if not 0 <= n < len(rows):
            raise UsageError(f"--demo-row {n} out of range: the demo has {len(rows)} conversations")
        return parse(json.dumps(rows[n]).encode(), fields, policy), f"demo row {n}"
    if opts.row < 0:
        raise UsageError("--row must be >= 0")
    inputs = resolve_inputs([opts.input])
    for raw in iter_raw_rows(inputs, fields.columns(), 1024, skip=opts.row):
        if raw.row == opts.row:
            assert raw.payload is not None
            parsed = parse(raw.payload, fields, policy, strip_nulls=False if raw.typed else None)
            return parsed, f"{inputs[raw.source].name} row {opts.row}"
    raise UsageError(f"--row {opts.row} out of range for {opts.input!r}")


def _roles(conversation: dict, policy: MaskPolicy | None) -> list[str]:
    """The template role of each message, as message_index numbers them."""
    try:
        messages = policy.shape(conversation)[0] if policy is not None else conversation.get("messages") or []
    except (KeyError, TypeError, ValueError):
        return []
    return [str(m.get("role", "?")) if isinstance(m, dict) else "?" for m in messages]


def _resolve(opts: ShowOptions) -> ShowOptions:
    opts = with_default_policy(opts)
    if opts.policy is None:
        return resolve_mode_fields(opts)
    given = [
        flag
        for flag, value in (
            ("--mode", opts.mode),
            ("--messages-field", opts.messages_field),
            ("--tools-field", opts.tools_field),
            ("--finish-reason-field", opts.finish_reason_field),
        )
        if value is not None
    ]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be combined with --policy (the policy decides labels and fields)")
    return opts


def run_show(opts: ShowOptions, out: IO[str] | None = None) -> int:
    """Print one row's tokens with their labels; exit code 1 when the row cannot be tokenized.

    In a reference mode the row is also judged on the spans (:mod:`chatmask.truth`): a wrong
    row gets a warning and its tokens whose label differs from the span-based labels (the CLI's
    default policy, :data:`SPAN_LABELS`) are marked. Blocks carry role badges from
    ``message_index`` (the policy's, or the span-based labelling's).
    """
    out = out if out is not None else sys.stdout
    opts = _resolve(opts)
    tokenizer = load_tokenizer(opts.tokenizer, opts.encoder, opts.allow_jinja2)  # type: ignore[arg-type]
    parsed, where = _read_row(opts)
    if parsed.error is not None or parsed.conversation is None:
        print(f"{where}: cannot be tokenized: {parsed.error}", file=sys.stderr)
        return 1
    tok = tokenizer.tok
    conversation = parsed.conversation
    rows: list[Any] = [conversation]  # a mapping row ({"messages", "tools"}), as tokenize_batch takes them
    policy = opts.policy
    if policy is not None:
        batch = tok.tokenize_batch(rows, policy=policy, on_error="skip")
    else:
        assert opts.mode is not None
        batch = tok.tokenize_batch(
            rows,
            mode=opts.mode,
            finish_reason=parsed.finish_reason or "",
            on_error="skip",
            flag_reference=opts.mode in REFERENCE_MODES,
        )
    if batch.errors or not len(batch):
        reason = batch.errors[0][1] if batch.errors else "dropped by the policy (longer than max_length)"
        print(f"{where}: cannot be tokenized: {reason}", file=sys.stderr)
        if batch.reference_raised:
            print(
                f"{where}: the reference raises on this row, but its message spans work (show it with --policy)",
                file=sys.stderr,
            )
        return 1
    ids = batch[0]["input_ids"].tolist()
    labels = batch[0]["labels"].tolist()[: len(ids)]  # labels can outnumber tokens (see TokenizedBatch)
    all_labels = batch[0]["labels"].tolist()
    message_index: list[int] | None = None
    differs: list[bool] | None = None
    span_labels: list[int] | None = None
    warning = None
    if policy is not None:
        message_index = batch[0]["message_index"].tolist()
    else:
        spans = tok.tokenize_batch(rows, policy=SPAN_LABELS, on_error="skip")
        if len(spans) and spans[0]["input_ids"].tolist() == ids:
            message_index = spans[0]["message_index"].tolist()
            span_labels = spans[0]["labels"].tolist()
        if batch.reference_wrong is not None and bool(batch.reference_wrong[0]):
            causes = batch.reference_causes[0] if batch.reference_causes else ""
            if span_labels is not None:
                differs = [(a != -100) != (b != -100) for a, b in zip(labels, span_labels)]
            n = sum(differs) if differs else 0
            warning = (
                f"warning: the reference's mask (mode {opts.mode}) is wrong on this row ({causes.replace(',', ', ')}); "
                f"{n} token(s) differ from the span-based labels (assistant turns and their end tokens), marked"
            )
    pieces = display_pieces(tok, ids)
    specials = special_token_texts(tok, has_tools=bool(conversation.get("tools")))
    color = not opts.no_color and out.isatty()
    trained = sum(1 for label in all_labels if label != -100)
    id_part = f" (id {parsed.id})" if parsed.id else ""
    labelled = "policy" if policy is not None else f"mode={opts.mode}"
    header = f"{where}{id_part}, {labelled}: {len(ids)} tokens, {trained} trained"
    roles = _roles(conversation, policy)
    badges: dict[int, str] = {}
    if message_index is not None:
        for k, m in enumerate(message_index):
            if m >= 0 and (k == 0 or message_index[k - 1] != m):
                badges[k] = roles[m] if 0 <= m < len(roles) else "?"
    print(header, file=out)
    if warning:
        print(warning + (" (red underline)" if color else " ‼"), file=out)
    print(legend(color, differs is not None), file=out)
    print(render_mask(pieces, labels, color, specials, differs, badges), file=out)
    if opts.html:
        page = render_html(
            pieces,
            ids,
            labels,
            specials,
            f"chatmask show: {header}",
            message_index=message_index,
            roles=roles,
            differs=differs,
            span_labels=span_labels,
            warning=warning and warning + " (wavy underline)",
        )
        Path(opts.html).write_text(page, encoding="utf-8")
        print(f"wrote {opts.html}", file=out)
    return 0
