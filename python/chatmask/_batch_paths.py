"""The batch paths of `ChatTokenizer.tokenize_batch`: rows shaped by a `MaskPolicy` first, reference
modes (judged on the spans when flagged), and rows whose template renders through Jinja2 (one at a
time, since rendering needs the GIL)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .batch import TokenizedBatch
from .errors import ChatMaskError, ConversationTypeError
from .rows import CoreRow, core_rows, python_row
from .truth import REFERENCE_MODES, SPAN_POLICY, UNMEASURED, attach_verdicts

if TYPE_CHECKING:
    from ._tokenizer import ChatTokenizer


def tokenize_policy_batch(tok: ChatTokenizer, rows, policy, num_threads, on_error, ids_dtype, chat_template, kwargs):
    shaped: list[Any] = []
    shape_errors: list[tuple[int, str]] = []
    spec = policy.shape_spec()  # None: the policy shapes in Python only (split_thinking)
    checked = False  # whether a row with messages is shaped in Python (the template check below)
    for i, row in enumerate(rows):
        if isinstance(row, CoreRow):
            if spec is not None and checked:  # the core shapes it
                shaped.append(row.core)
                continue
            row = row.python()
        try:
            messages, tools = policy.shape(row)
        except (KeyError, TypeError, ValueError) as e:
            reason = e.args[0] if e.args else str(e)  # a KeyError's str() adds quotes
            if on_error == "raise":
                error = ConversationTypeError(f"row {i}: {reason}")
                error.row = i
                raise error from None
            shape_errors.append((i, reason))
            messages, tools = None, None
        checked = checked or bool(messages)
        row_out = {"messages": messages}
        if tools is not None:
            row_out["tools"] = tools
        shaped.append(row_out)
    if shaped:
        first = next((r for r in shaped if isinstance(r, dict) and r["messages"]), None)
        if first is not None:
            tok._require_native(
                first["messages"], chat_template, {**kwargs, **({"tools": first["tools"]} if "tools" in first else {})}
            )
    arrays = tok._core.tokenize_batch(
        shaped,
        num_threads=num_threads,
        on_error=on_error,
        ids_dtype=ids_dtype,
        chat_template=chat_template,
        policy=policy.to_core(),
        shape=spec,
        **kwargs,
    )
    if shape_errors:
        # Those rows went in as None and failed in the core too; keep the clearer message.
        clear = dict(shape_errors)
        arrays["errors"] = [(i, clear.get(i, msg)) for i, msg in arrays["errors"]]
    return TokenizedBatch(**arrays)


def tokenize_reference_batch(
    tok: ChatTokenizer, rows, mode, finish_reason, num_threads, on_error, ids_dtype, chat_template, kwargs, flag
) -> TokenizedBatch:
    """A reference-mode batch in the core (or row by row through Jinja2); with `flag`, each row's
    mask judged on its spans in the same pass (:mod:`chatmask.truth`)."""
    if flag and mode not in REFERENCE_MODES:
        raise ValueError(f"reference flags exist for modes last, all and multistep, not {mode!r}")
    if needs_python_rendering(tok, rows, chat_template, kwargs):
        batch = tokenize_rows_in_python(tok, rows, mode, finish_reason, on_error, ids_dtype, chat_template, kwargs)
        if flag:  # the spans need the native renderer: every row is left unjudged
            attach_verdicts(batch, np.full(len(batch), UNMEASURED, np.uint8), [])
        return batch
    arrays = tok._core.tokenize_batch(
        core_rows(rows),
        mode=mode,
        finish_reason=finish_reason,
        num_threads=num_threads,
        on_error=on_error,
        ids_dtype=ids_dtype,
        chat_template=chat_template,
        judge=SPAN_POLICY.to_core() if flag else None,
        **kwargs,
    )
    verdicts, raised = arrays.pop("reference_verdicts", None), arrays.pop("reference_raised", None)
    batch = TokenizedBatch(**arrays)
    if verdicts is not None:
        attach_verdicts(batch, verdicts, raised)
    return batch


def tokenize_rows_in_python(
    tok: ChatTokenizer, rows, mode, finish_reason, on_error, ids_dtype, chat_template, kwargs
) -> TokenizedBatch:
    """The batch, one row at a time, for templates on the Jinja2 path (rendering needs the GIL)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    ids, labels, rows_out, errors = [], [], [], []
    for i, row in enumerate(rows):
        finish = finish_reason if isinstance(finish_reason, str) else finish_reason[i]
        try:
            chat, row_kwargs = row_parts(python_row(row), kwargs)
            out = tok.tokenize_for_trainer(chat, mode, finish or "", chat_template=chat_template, **row_kwargs)
        except ChatMaskError as e:
            if on_error == "raise":
                e.row = i
                e.args = (f"row {i}: {e}",)
                raise
            errors.append((i, str(e)))
            continue
        ids.append(out["tokens"])
        labels.append(out["masks"])
        rows_out.append(i)

    def flat(parts, dtype):
        return np.fromiter((x for p in parts for x in p), dtype=dtype)

    def offsets(parts):
        return np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)]).astype(np.int64)

    return TokenizedBatch(
        input_ids=flat(ids, np.dtype(ids_dtype)),
        labels=flat(labels, np.int64),
        offsets=offsets(ids),
        label_offsets=offsets(labels),
        rows=np.array(rows_out, dtype=np.int64),
        errors=errors,
    )


def row_parts(row: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A batch row's messages and template kwargs (a mapping row may carry its own tools/documents)."""
    if isinstance(row, Mapping):
        extra = {k: row[k] for k in ("tools", "documents") if row.get(k) is not None}
        return row.get("messages"), {**kwargs, **extra}
    return row, kwargs


def needs_python_rendering(
    tok: ChatTokenizer, rows: Sequence[Any], chat_template: str | None, kwargs: dict[str, Any]
) -> bool:
    """Whether any template the batch uses takes the Jinja2 path (verifying the first rows)."""
    for row in rows[: max(tok._verify_left, 1)]:
        chat, row_kwargs = row_parts(python_row(row), kwargs)
        if isinstance(chat, (list, tuple)) and tok._route(chat, chat_template, row_kwargs) is not None:
            return True
    return bool(tok._fallback)
