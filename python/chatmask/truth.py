"""Mask truth at run time: which rows of a reference-mode batch (``last``, ``all``,
``multistep``) the reference's prefix-count arithmetic labels wrongly, measured on chatmask's
exact message spans.

The criterion is ``benches/reference_errors.py``'s (``tests/_reference_vs_spans.measure_row``).
A row is wrong, for one or more named causes, when the reference:

* ``raises``: fails (an error row) where the span method succeeds;
* ``length``: returns masks of another length than its tokens;
* ``untrained_target_field``: leaves untrained a token of a field (content, reasoning, tool
  call) of a message its mode targets (``all``: every assistant turn; ``last`` / ``multistep``:
  the last one);
* ``trains_non_target``: trains a token that ``message_index`` gives to a message it does not
  target (user, system, tool text or another assistant turn);
* ``label_not_token``: trains a label that is not the token at that position.

Training template text (``message_index`` -1, the ``\\n`` after ``<|im_end|>``) is not wrong.

How: one more batch call over the same rows with :data:`SPAN_POLICY` (a :class:`MaskPolicy`
that trains exactly the assistant messages' fields: no end tokens, no turn prefix), which gives
every token its ``message_index`` and marks the field tokens of assistant messages; the
comparison is vectorised over the batch. A row whose span tokens differ from the reference's
(the span render differs, e.g. under a role map) is not judged (``unmeasured``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .policy import MaskPolicy
from .rows import CoreRow

REFERENCE_MODES = ("last", "all", "multistep")  # the modes with a prefix-count mask to judge
CAUSES = ("raises", "length", "untrained_target_field", "trains_non_target", "label_not_token")
ASSISTANT_ROLES = ("assistant", "agent")  # the reference's UNMASKED_ROLES
IGNORE = -100
# Template roles map to themselves only: the span render must be the reference's render.
_IDENTITY_ROLES = {"user": ("user",), "assistant": ("assistant",), "system": ("system",), "tool": ("tool",)}
SPAN_POLICY = MaskPolicy(
    roles_to_train=("assistant",),
    train_on_eos="none",
    train_on_eot="none",
    train_turn_prefix=False,
    roles=_IDENTITY_ROLES,
)


@dataclass
class ReferenceTruth:
    """Per output row of a reference-mode batch: ``wrong`` (bool) and ``causes`` (the causes
    joined by ``,``, ``""`` when right); ``unmeasured`` rows were not judged. ``raised`` lists
    the input rows (error rows of the batch) where the reference raises but the spans work."""

    wrong: np.ndarray
    causes: list[str]
    unmeasured: np.ndarray
    raised: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Rows by cause (a row may have several), ``raises`` included."""
        out = {c: 0 for c in CAUSES}
        for causes in self.causes:
            for c in causes.split(",") if causes else ():
                out[c] += 1
        out["raises"] = len(self.raised)
        return out


def _assistant_messages(row: Any) -> list[bool]:
    """Per message of `row`: whether its role is one the reference trains."""
    if isinstance(row, CoreRow):
        return row.core.assistant_messages()
    if isinstance(row, Mapping):
        msgs = row.get("messages") or []
    else:
        msgs = row if isinstance(row, (list, tuple)) else []
    return [isinstance(m, Mapping) and m.get("role") in ASSISTANT_ROLES for m in msgs]


def _gather(flat: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The segments ``flat[offsets[i]:offsets[i+1]]`` for i in `idx`, concatenated, and their lengths."""
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return flat[:0], lengths
    shift = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return flat[np.arange(total) + shift], lengths


def flag_reference(
    tok: Any, rows: Sequence[Any], mode: str, batch: Any, num_threads: int | None = None, **template_kwargs: Any
) -> ReferenceTruth:
    """Judge `batch` (``tok.tokenize_batch(rows, mode=mode, on_error="skip")``) against the spans."""
    n_out = len(batch.rows)
    wrong = np.zeros(n_out, dtype=bool)
    unmeasured = np.zeros(n_out, dtype=bool)
    causes = [""] * n_out
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference flags exist for modes last, all and multistep, not {mode!r}")
    spans = tok.tokenize_batch(rows, policy=SPAN_POLICY, num_threads=num_threads, on_error="skip", **template_kwargs)
    span_out = np.full(len(rows), -1, dtype=np.int64)
    span_out[np.asarray(spans.rows, dtype=np.int64)] = np.arange(len(spans.rows))
    raised = sorted(int(r) for r, _ in batch.errors if span_out[int(r)] >= 0)

    ref_rows = np.asarray(batch.rows, dtype=np.int64)
    s_idx = span_out[ref_rows] if n_out else np.zeros(0, np.int64)
    unmeasured |= s_idx < 0
    ref_len = np.diff(batch.offsets)
    span_len = np.where(s_idx >= 0, np.diff(spans.offsets)[np.maximum(s_idx, 0)] if len(spans.rows) else 0, -1)
    unmeasured |= ref_len != span_len
    length = np.diff(batch.label_offsets) != ref_len
    ok = np.flatnonzero(~unmeasured)

    ids, lengths = _gather(np.asarray(batch.input_ids, dtype=np.int64), batch.offsets, ok)
    sids, _ = _gather(np.asarray(spans.input_ids, dtype=np.int64), spans.offsets, s_idx[ok])
    tok_row = np.repeat(np.arange(len(ok)), lengths)
    differ = np.bincount(tok_row[ids != sids], minlength=len(ok)) > 0
    # Labels: rows whose masks have the tokens' length gather directly; the others (rare) are
    # padded or cut to the tokens' length, as the bench does.
    same = ~length[ok]
    if same.all():
        labels, _ = _gather(batch.labels, batch.label_offsets, ok)
    else:
        parts = []
        for k, i in enumerate(ok.tolist()):
            masks = batch.labels[batch.label_offsets[i] : batch.label_offsets[i + 1]]
            want = int(lengths[k])
            parts.append(
                np.concatenate([masks, np.full(max(0, want - len(masks)), IGNORE)])[:want] if not same[k] else masks
            )
        labels = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    index, _ = _gather(np.asarray(spans.message_index, dtype=np.int64), spans.offsets, s_idx[ok])
    field_tok, _ = _gather(spans.labels, spans.offsets, s_idx[ok])
    field_tok = field_tok != IGNORE

    # Which messages each row's mode targets, flat over the rows' messages.
    flags: list[bool] = []
    msg_off = np.zeros(len(ok) + 1, dtype=np.int64)
    for k, i in enumerate(ok.tolist()):
        roles = _assistant_messages(rows[int(ref_rows[i])])
        if mode != "all":
            last = max((j for j, r in enumerate(roles) if r), default=-1)
            roles = [j == last for j in range(len(roles))]
        flags.extend(roles)
        msg_off[k + 1] = len(flags)
    target_of = np.asarray(flags, dtype=bool)
    has_msg = index >= 0
    pos = msg_off[tok_row] + np.maximum(index, 0)
    valid = has_msg & (pos < msg_off[tok_row + 1])
    is_target = np.zeros(len(index), dtype=bool)
    is_target[valid] = target_of[pos[valid]]
    trained = labels != IGNORE

    def per_row(mask: np.ndarray) -> np.ndarray:
        return np.bincount(tok_row[mask], minlength=len(ok)) > 0

    found = {
        "length": length[ok],
        "untrained_target_field": per_row(field_tok & is_target & ~trained),
        "trains_non_target": per_row(trained & has_msg & ~is_target),
        "label_not_token": per_row(trained & (labels != ids)),
    }
    for k, i in enumerate(ok.tolist()):
        if differ[k]:
            unmeasured[i] = True
            continue
        names = [c for c in CAUSES[1:] if found[c][k]]
        if names:
            wrong[i] = True
            causes[i] = ",".join(names)
    return ReferenceTruth(wrong, causes, unmeasured, raised)


def flagged_batch(
    tok: Any,
    rows: Sequence[Any],
    mode: str,
    finish_reason: Any,
    num_threads: int | None,
    on_error: str,
    ids_dtype: str,
    policy: Any,
    template_kwargs: dict[str, Any],
) -> Any:
    """``tokenize_batch(..., flag_reference=True)``: the batch, labels unchanged, plus per output
    row ``reference_wrong`` (bool array), ``reference_causes`` (str), ``reference_unmeasured``
    (bool array) and ``reference_raised`` (input rows)."""
    if policy is not None:
        raise ValueError("flag_reference judges the reference modes; it does not apply with a policy")
    batch = tok.tokenize_batch(rows, mode, finish_reason, num_threads, on_error, ids_dtype, **template_kwargs)
    truth = flag_reference(tok, rows, mode, batch, num_threads, **template_kwargs)
    batch.reference_wrong, batch.reference_causes = truth.wrong, truth.causes
    batch.reference_unmeasured, batch.reference_raised = truth.unmeasured, truth.raised
    return batch


def reference_wrong(
    tokenizer: Any, chat: Sequence[Any], mode: str = "last", finish_reason: str = "", **template_kwargs: Any
) -> tuple[str, ...]:
    """For drop-in users: why the reference's mask of one conversation is wrong, ``()`` when it
    is right. `mode` is what the drop-in call used: ``tokenize_for_trainer`` is ``"last"``
    (``"all"`` with ``train_on_all_assistant_turns=True``), ``tokenize_for_trainer_multistep`` is
    ``"multistep"``. `tokenizer` is a transformers fast tokenizer or a ChatTokenizer. The drop-in
    output itself is never changed. ``("unmeasured",)``: the span render differs, not judged.
    """
    from .dropin import core_for

    batch = core_for(tokenizer).tokenize_batch(
        [chat], mode=mode, finish_reason=finish_reason, on_error="skip", flag_reference=True, **template_kwargs
    )
    if batch.reference_raised:
        return ("raises",)
    if not len(batch):
        return ()  # the spans fail too: nothing to measure against
    assert batch.reference_unmeasured is not None and batch.reference_causes is not None
    if batch.reference_unmeasured[0]:
        return ("unmeasured",)
    causes = batch.reference_causes[0]
    return tuple(causes.split(",")) if causes else ()
