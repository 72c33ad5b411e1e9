"""RL rollouts, token in / token out: the ids a server sampled, placed among the template's tokens.

A rollout is a conversation plus, per assistant message, the exact ids the inference server
sampled for it (``None`` for a message that was not sampled). The output is the template's
tokens around each sampled message with the sampled ids in place of that message's text tokens:
never re-encoded, so the trainer scores the tokens the policy produced. Each sampled message's
region comes from its located spans (see ``docs/rollouts.md``); ids that decode to other text
than the template renders there raise :class:`chatmask.RolloutError` naming the message.

- A trailing stop token (the EOS or another special token) is kept and trained. Where the
  template prints the same token after the message it stands once (``stop="consumed"``), else it
  is kept after the ids (``"kept"``). ``finish_reason="length"`` means none was sampled: the
  output ends after the last sampled ids (``"length"``).
- ``retokenized_same``: whether the template's own tokens for that text are the sampled ids.
- ``extends_previous``: whether a fresh render of the prompt before the turn starts with the
  previous turn's prompt and sampled ids. It is False where the template rewrites history
  (Qwen3 drops an earlier turn's reasoning); such a turn is also ``placed=False`` without a
  bridge: the output has the template's rewrite for it, untrained.
- ``bridge=True`` builds each prompt as the previous sequence plus the template's own tokens for
  what follows the previous sampled message (the spans of a fresh render of that prompt), so the
  sequence is the context the model sampled in; ``bridge_differs`` marks the turns where that
  differs from the fresh render a trainer re-rendering the conversation would see.

Labels: sampled ids (and a sampled stop token) are trained; the template's tokens are labelled
by the policy (default :class:`MaskPolicy`: assistant messages and their end tokens, so a turn
whose stop token the server left out still trains the template's end token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, cast

import numpy as np

from .policy import MaskPolicy

if TYPE_CHECKING:
    from ._tokenizer import ChatTokenizer

#: The default policy for the template's tokens (the sampled ids are trained whatever it says).
ROLLOUT_POLICY = MaskPolicy()

STOPS = ("absent", "consumed", "kept", "length")


@dataclass(frozen=True)
class RolloutTurn:
    """One sampled assistant message of a rollout; `start`/`end` index the row's tokens."""

    message: int
    start: int
    end: int
    retokenized_same: bool
    stop: str
    placed: bool
    extends_previous: bool | None
    bridge_differs: bool | None


def _tri(value: int) -> bool | None:
    return None if value < 0 else bool(value)


class RolloutBatch:
    """The output of :meth:`ChatTokenizer.tokenize_rollout_batch`.

    Row ``i`` (input row ``rows[i]``) is ``input_ids[offsets[i]:offsets[i+1]]`` (likewise
    ``labels``, ``message_index``); its sampled turns are ``turns(i)``. ``errors`` are
    ``(row, message)`` of rows that failed (``on_error="skip"``).
    """

    def __init__(self, arrays: Mapping[str, Any]) -> None:
        self.input_ids: np.ndarray = arrays["input_ids"]
        self.labels: np.ndarray = arrays["labels"]
        self.message_index: np.ndarray = arrays["message_index"]
        self.offsets: np.ndarray = arrays["offsets"]
        self.rows: np.ndarray = arrays["rows"]
        self.turn_offsets: np.ndarray = arrays["turn_offsets"]
        self._turns = {
            k: arrays[k]
            for k in ("turn_message", "turn_start", "turn_end", "retokenized_same", "placed", "stop")
            + ("extends_previous", "bridge_differs")
        }
        self.errors: list[tuple[int, str]] = list(arrays["errors"])

    def __len__(self) -> int:
        return len(self.rows)

    def turns(self, i: int) -> list[RolloutTurn]:
        t = self._turns
        return [
            RolloutTurn(
                message=int(t["turn_message"][k]),
                start=int(t["turn_start"][k]),
                end=int(t["turn_end"][k]),
                retokenized_same=bool(t["retokenized_same"][k]),
                stop=t["stop"][k],
                placed=bool(t["placed"][k]),
                extends_previous=_tri(int(t["extends_previous"][k])),
                bridge_differs=_tri(int(t["bridge_differs"][k])),
            )
            for k in range(int(self.turn_offsets[i]), int(self.turn_offsets[i + 1]))
        ]

    def __getitem__(self, i: int) -> dict[str, Any]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return {
            "input_ids": self.input_ids[a:b],
            "labels": self.labels[a:b],
            "message_index": self.message_index[a:b],
            "turns": self.turns(i),
        }


@dataclass(frozen=True)
class GroupArrays:
    """A group of completions of one prompt (atropos' ``ScoredDataGroup``): per completion the
    prompt's ids then its sampled ids, masks -100 on the prompt, and the scores as given."""

    tokens: list[list[int]]
    masks: list[list[int]]
    scores: list[float] | None


def _rows(rows: Iterable[Any]) -> list[Any]:
    """Rows as the core reads them: mappings (a ``(messages, completion_ids, finish_reason)``
    tuple becomes one)."""
    out: list[Any] = []
    for row in rows:
        if isinstance(row, tuple) and len(row) == 3:
            row = {"messages": row[0], "completion_ids": row[1], "finish_reason": row[2]}
        out.append(row)
    return out


class RolloutMethods:
    """The rollout entry points of :class:`chatmask.ChatTokenizer`."""

    def tokenize_rollout(
        self,
        messages: Sequence[Mapping[str, Any]],
        completion_ids: Sequence[Sequence[int] | None],
        policy: MaskPolicy | None = None,
        finish_reason: str | None = "",
        bridge: bool = False,
        **template_kwargs: Any,
    ) -> dict[str, Any]:
        """One rollout as numpy arrays ``input_ids``, ``labels`` (-100 where not trained),
        ``message_index`` and ``turns`` (a :class:`RolloutTurn` per sampled message).

        `completion_ids` has one entry per assistant message of `messages`, in order: the ids
        sampled for it (they may end with the stop token) or None. See :mod:`chatmask.rollout`.
        """
        batch = self.tokenize_rollout_batch(
            [(messages, completion_ids, finish_reason)], policy, bridge, 1, "raise", **template_kwargs
        )
        return batch[0]

    def tokenize_rollout_batch(
        self,
        rows: Iterable[Any],
        policy: MaskPolicy | None = None,
        bridge: bool = False,
        num_threads: int | None = None,
        on_error: str = "raise",
        **template_kwargs: Any,
    ) -> RolloutBatch:
        """Many rollouts in parallel with the GIL released. Each row is ``{"messages": ...,
        "completion_ids": ...}`` with optional ``finish_reason`` and the row's own ``tools`` /
        ``documents``, or a ``(messages, completion_ids, finish_reason)`` tuple; see
        :meth:`tokenize_rollout` and :class:`RolloutBatch`."""
        tok = cast("ChatTokenizer", self)
        kwargs = dict(template_kwargs)
        chat_template = kwargs.pop("chat_template", None)
        rows = _rows(rows)
        first = rows[0] if rows and isinstance(rows[0], Mapping) else None
        if first is not None and first.get("messages"):
            tools = {"tools": first["tools"]} if first.get("tools") is not None else {}
            tok._require_native(first["messages"], chat_template, {**kwargs, **tools})
        arrays = tok._core.tokenize_rollout_batch(
            rows,
            (policy or ROLLOUT_POLICY).to_core(),
            bridge=bridge,
            num_threads=num_threads,
            on_error=on_error,
            chat_template=chat_template,
            **kwargs,
        )
        return RolloutBatch(arrays)

    def tokenize_group(
        self,
        messages: Sequence[Mapping[str, Any]],
        completion_ids: Sequence[Sequence[int]],
        scores: Sequence[float] | None = None,
        **template_kwargs: Any,
    ) -> GroupArrays:
        """A group of completions sampled after one prompt, as atropos' ``ScoredDataGroup`` holds
        them: the prompt (`messages` with the generation prompt) is rendered and encoded once,
        and each completion's sampled ids follow it as they are, trained."""
        tok = cast("ChatTokenizer", self)
        if scores is not None and len(scores) != len(completion_ids):
            raise ValueError(f"{len(scores)} scores for {len(completion_ids)} completions")
        prompt = cast(
            "list[int]", tok.apply_chat_template(list(messages), add_generation_prompt=True, **template_kwargs)
        )
        masked = [-100] * len(prompt)
        tokens = [prompt + [int(i) for i in ids] for ids in completion_ids]
        masks = [masked + t[len(prompt) :] for t in tokens]
        return GroupArrays(tokens, masks, None if scores is None else [float(s) for s in scores])


__all__ = ["ROLLOUT_POLICY", "STOPS", "GroupArrays", "RolloutBatch", "RolloutMethods", "RolloutTurn"]
