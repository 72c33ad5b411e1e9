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

How: the core judges each row in the same pass that labels it (``src/truth.rs``). It renders the
whole conversation and encodes it once, for the reference's labels and for the spans; locating the
spans costs one more (marked) render, and the spans are labelled with :data:`SPAN_POLICY` (a
:class:`MaskPolicy` that trains exactly the assistant messages' fields: no end tokens, no turn
prefix), which gives every token its ``message_index`` and marks the field tokens of assistant
messages. A row is not judged (``unmeasured``) when its spans cannot be located, or when the
reference's tokens are not the render's (``finish_reason="length"`` removed the end token).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .policy import MaskPolicy

REFERENCE_MODES = ("last", "all", "multistep")  # the modes with a prefix-count mask to judge
CAUSES = ("raises", "length", "untrained_target_field", "trains_non_target", "label_not_token")
# The core labels the row's own messages with it (no shaping: its roles map is never applied).
SPAN_POLICY = MaskPolicy(
    roles_to_train=("assistant",),
    train_on_eos="none",
    train_on_eot="none",
    train_turn_prefix=False,
)


# The core's verdict bits (src/truth.rs), in CAUSES order after "raises".
_CAUSE_BITS = tuple((cause, 1 << k) for k, cause in enumerate(CAUSES[1:]))
UNMEASURED = 0x80


def attach_verdicts(batch: Any, verdicts: np.ndarray, raised: list[int]) -> None:
    """Sets a batch's ``reference_wrong`` (bool per output row), ``reference_causes`` (the
    causes joined by ``,``; ``""`` when right or not judged), ``reference_unmeasured`` (bool)
    and ``reference_raised`` (input rows) from the core's verdict bits."""
    verdicts = np.asarray(verdicts, dtype=np.uint8)
    batch.reference_verdicts = verdicts
    unmeasured = (verdicts & UNMEASURED) != 0
    batch.reference_wrong = ~unmeasured & (verdicts != 0)
    names = {v: ",".join(c for c, bit in _CAUSE_BITS if v & bit) for v in range(UNMEASURED)}
    batch.reference_causes = ["" if v & UNMEASURED else names[v] for v in verdicts.tolist()]
    batch.reference_unmeasured = unmeasured
    batch.reference_raised = list(raised)


def reference_wrong(
    tokenizer: Any, chat: Sequence[Any], mode: str = "last", finish_reason: str = "", **template_kwargs: Any
) -> tuple[str, ...]:
    """For drop-in users: why the reference's mask of one conversation is wrong, ``()`` when it
    is right. `mode` is what the drop-in call used: ``tokenize_for_trainer`` is ``"last"``
    (``"all"`` with ``train_on_all_assistant_turns=True``), ``tokenize_for_trainer_multistep`` is
    ``"multistep"``. `tokenizer` is a transformers fast tokenizer or a ChatTokenizer. The drop-in
    output itself is never changed. ``("unmeasured",)``: not judged (the spans cannot be located, or the
    reference's tokens are not the render's).
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
