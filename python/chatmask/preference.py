"""Preference pairs (DPO-style `prompt` / `chosen` / `rejected`), exact from spans.

Each branch (prompt + chosen, prompt + rejected) is tokenized whole, once, as
:meth:`ChatTokenizer.tokenize` tokenizes it, and split at the first token a completion message
owns: the first token whose ``message_index`` is at least the prompt's message count. So
``prompt_input_ids + chosen_input_ids`` is exactly the chosen conversation's ``input_ids`` (and
likewise for rejected), whatever the template does to the history. Where the two branches'
prompt tokens differ, or a token straddles the split, the pair is flagged, never patched.

Template text between the prompt's last message and the completion's first field goes where the
policy's ``message_index`` puts it: with ``train_turn_prefix=True`` (the default) the generation
prompt (``<|im_start|>assistant\\n``) is the prompt's, as in TRL, and text the model writes
after it (Qwen3's ``<think>`` block, a tool-call opener) the completion's; with
``train_turn_prefix=False`` the completion starts at its first field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence, cast

import numpy as np

from ._preference_rows import PreferenceRowError, PreferenceRowTypeError, read_row
from .errors import ChatMaskError, ConversationError
from .policy import MaskPolicy

if TYPE_CHECKING:
    from ._tokenizer import ChatTokenizer

#: The default policy: every message trained, with its end token. Only the completion's labels
#: are returned, so this trains the completion messages and their end tokens (and, of the
#: template text, only what those messages own: a turn prefix, text up to the end token).
PREFERENCE_POLICY = MaskPolicy(train_on_inputs=True)

#: The flags a pair can carry; ``straddles_split`` and ``prompt_after_completion`` name the branch
#: (``"straddles_split:chosen"``).
FLAGS = ("prompt_differs", "straddles_split", "prompt_after_completion")

#: The column of a pair's flags in ``chatmask tokenize --task preference`` and the adapters.
FLAGS_COLUMN = "preference_flags"

FIELDS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "chosen_labels", "rejected_labels")
_BRANCHES = ("chosen", "rejected")


class PreferenceBatch:
    """The output of :meth:`ChatTokenizer.tokenize_preference_batch`.

    Pair ``i`` (input row ``rows[i]``) is ``prompt_input_ids[prompt_offsets[i]:prompt_offsets[i+1]]``,
    ``chosen_input_ids`` / ``chosen_labels`` between ``chosen_offsets[i]`` and ``[i+1]``, and
    likewise for rejected; ``flags[i]`` lists its flags (empty when exact and consistent).
    ``prompt_input_ids`` are the chosen branch's prompt tokens (see ``prompt_differs``).
    ``errors`` are ``(row, message)`` of rows that failed (``on_error="skip"``), ``dropped`` the
    rows the policy's ``overflow="drop"`` removed.
    """

    def __init__(
        self,
        prompt_input_ids: np.ndarray,
        prompt_offsets: np.ndarray,
        chosen_input_ids: np.ndarray,
        chosen_labels: np.ndarray,
        chosen_offsets: np.ndarray,
        rejected_input_ids: np.ndarray,
        rejected_labels: np.ndarray,
        rejected_offsets: np.ndarray,
        flags: list[list[str]],
        rows: np.ndarray,
        errors: list[tuple[int, str]],
        dropped: list[int],
    ) -> None:
        self.prompt_input_ids = prompt_input_ids
        self.prompt_offsets = prompt_offsets
        self.chosen_input_ids = chosen_input_ids
        self.chosen_labels = chosen_labels
        self.chosen_offsets = chosen_offsets
        self.rejected_input_ids = rejected_input_ids
        self.rejected_labels = rejected_labels
        self.rejected_offsets = rejected_offsets
        self.flags = flags
        self.rows = rows
        self.errors = errors
        self.dropped = dropped

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        flagged = sum(1 for f in self.flags if f)
        return f"PreferenceBatch(rows={len(self)}, flagged={flagged}, errors={len(self.errors)})"

    def _slices(self, i: int) -> dict[str, np.ndarray]:
        p, c, r = self.prompt_offsets, self.chosen_offsets, self.rejected_offsets
        return {
            "prompt_input_ids": self.prompt_input_ids[p[i] : p[i + 1]],
            "chosen_input_ids": self.chosen_input_ids[c[i] : c[i + 1]],
            "rejected_input_ids": self.rejected_input_ids[r[i] : r[i + 1]],
            "chosen_labels": self.chosen_labels[c[i] : c[i + 1]],
            "rejected_labels": self.rejected_labels[r[i] : r[i + 1]],
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for a batch of {n}")
        out: dict[str, Any] = self._slices(i)
        out["flags"] = list(self.flags[i])
        return out

    def to_arrow(self) -> Any:
        """A pyarrow Table (``row``, the five token columns, ``flags``); list columns share the flat buffers."""
        try:
            import pyarrow as pa
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("to_arrow() needs pyarrow: pip install pyarrow") from e

        def column(offsets: np.ndarray, values: np.ndarray) -> Any:
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32, copy=False)), pa.array(values))

        return pa.table(
            {
                "row": pa.array(self.rows),
                "prompt_input_ids": column(self.prompt_offsets, self.prompt_input_ids),
                "chosen_input_ids": column(self.chosen_offsets, self.chosen_input_ids),
                "rejected_input_ids": column(self.rejected_offsets, self.rejected_input_ids),
                "chosen_labels": column(self.chosen_offsets, self.chosen_labels),
                "rejected_labels": column(self.rejected_offsets, self.rejected_labels),
                "flags": pa.array(self.flags, type=pa.list_(pa.string())),
            }
        )


def _fail(on_error: str, errors: list[tuple[int, str]], row: int, error: ChatMaskError) -> None:
    if on_error == "raise":
        error.row = row
        error.args = (f"row {row}: {error}",)
        raise error
    errors.append((row, str(error)))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def tokenize_preference_batch(
    tok: ChatTokenizer,
    rows: Iterable[Any],
    policy: MaskPolicy | None,
    num_threads: int | None,
    on_error: str,
    ids_dtype: str,
    template_kwargs: dict[str, Any],
) -> PreferenceBatch:
    """See :meth:`ChatTokenizer.tokenize_preference_batch`."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    policy = policy or PREFERENCE_POLICY
    kwargs = dict(template_kwargs)
    chat_template = kwargs.pop("chat_template", None)
    errors: list[tuple[int, str]] = []
    branches: list[dict[str, Any]] = []  # 2 per readable row: chosen, rejected
    pair_rows: list[int] = []
    prompt_lengths: list[int] = []
    for i, row in enumerate(rows):
        try:
            chosen, rejected, n_prompt, tools = read_row(row, policy)
        except (PreferenceRowError, PreferenceRowTypeError) as e:
            _fail(on_error, errors, i, e)
            continue
        for messages in (chosen, rejected):
            branches.append({"messages": messages} if tools is None else {"messages": messages, "tools": tools})
        pair_rows.append(i)
        prompt_lengths.append(n_prompt)
    if branches:
        first = branches[0]
        tok._require_native(
            first["messages"], chat_template, {**kwargs, **{k: v for k, v in first.items() if k == "tools"}}
        )
    try:
        arrays = tok._core.tokenize_batch(
            branches,
            num_threads=num_threads,
            on_error=on_error,
            ids_dtype=ids_dtype,
            chat_template=chat_template,
            policy=policy.to_core(),
            shape=None,
            **kwargs,
        )
    except ChatMaskError as e:
        if e.row is None:
            raise
        # The core names the branch row; the caller's row is the pair's.
        branch, message = e.row, str(e).removeprefix(f"row {e.row}: ")
        e.row = pair_rows[branch // 2]
        e.args = (f"row {e.row}: {_BRANCHES[branch % 2]}: {message}",)
        raise
    return _split(arrays, pair_rows, prompt_lengths, errors, on_error)


def _split(
    arrays: dict[str, Any],
    pair_rows: Sequence[int],
    prompt_lengths: Sequence[int],
    errors: list[tuple[int, str]],
    on_error: str,
) -> PreferenceBatch:
    """The core's branch rows (chosen, rejected, chosen, ...) split into pairs.

    One loop over the pairs on numpy views: each branch's tokens are scanned about four times
    (the split, prompt tokens after it, the prompt comparison) and copied once, into the outputs.
    """
    ids, labels, index = arrays["input_ids"], arrays["labels"], arrays["message_index"]
    straddles, offsets = arrays["straddles_start"], arrays["offsets"].tolist()
    # As unsigned, template text (-1) is larger than any prompt length: one comparison finds a
    # prompt message's token.
    owner = index.view(np.uint32)
    where = np.full(2 * len(pair_rows), -1, dtype=np.int64)
    where[arrays["rows"]] = np.arange(len(arrays["rows"]))
    failed = {pair_rows[b // 2] for b, _ in arrays["errors"]}
    for b, message in arrays["errors"]:  # on_error="raise" raised in the core already
        errors.append((pair_rows[b // 2], f"{_BRANCHES[b % 2]}: {message}"))
    dropped = sorted({pair_rows[b // 2] for b in arrays.get("dropped", [])})
    views: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
    lengths: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    flags: list[list[str]] = []
    kept: list[int] = []
    for p, row in enumerate(pair_rows):
        out_rows = where[2 * p], where[2 * p + 1]
        if out_rows[0] < 0 or out_rows[1] < 0:
            if row not in failed and row not in dropped:  # pragma: no cover - the core reports every row
                errors.append((row, "a branch has no output"))
            continue
        n_prompt = prompt_lengths[p]
        cuts, missing, pair_flags = [], [], []
        for side, b in zip(_BRANCHES, out_rows):
            start, end = offsets[b], offsets[b + 1]
            owned = index[start:end] >= n_prompt
            first = int(owned.argmax())
            if not owned[first]:
                missing.append(side)
                continue
            cut = start + first
            cuts.append((start, cut, end))
            if straddles[cut]:
                pair_flags.append(f"straddles_split:{side}")
            if (owner[cut:end] < n_prompt).any():
                pair_flags.append(f"prompt_after_completion:{side}")
        if missing:
            error = ConversationError(
                f"the {' and '.join(missing)} completion owns no token (an empty completion, or one the "
                "template does not print): the pair cannot be split"
            )
            _fail(on_error, errors, row, error)
            continue
        (c_start, c_cut, c_end), (r_start, r_cut, r_end) = cuts
        if not np.array_equal(ids[c_start:c_cut], ids[r_start:r_cut]):
            pair_flags.insert(0, "prompt_differs")
        views["prompt_input_ids"].append(ids[c_start:c_cut])
        views["chosen_input_ids"].append(ids[c_cut:c_end])
        views["chosen_labels"].append(labels[c_cut:c_end])
        views["rejected_input_ids"].append(ids[r_cut:r_end])
        views["rejected_labels"].append(labels[r_cut:r_end])
        lengths["prompt"].append(c_cut - c_start)
        lengths["chosen"].append(c_end - c_cut)
        lengths["rejected"].append(r_end - r_cut)
        flags.append(pair_flags)
        kept.append(row)
    errors.sort(key=lambda e: e[0])

    def flat(name: str, like: np.ndarray) -> np.ndarray:
        return np.concatenate(views[name]) if views[name] else like[:0].copy()

    return PreferenceBatch(
        prompt_input_ids=flat("prompt_input_ids", ids),
        prompt_offsets=_offsets(np.asarray(lengths["prompt"], dtype=np.int64)),
        chosen_input_ids=flat("chosen_input_ids", ids),
        chosen_labels=flat("chosen_labels", labels),
        chosen_offsets=_offsets(np.asarray(lengths["chosen"], dtype=np.int64)),
        rejected_input_ids=flat("rejected_input_ids", ids),
        rejected_labels=flat("rejected_labels", labels),
        rejected_offsets=_offsets(np.asarray(lengths["rejected"], dtype=np.int64)),
        flags=flags,
        rows=np.asarray(kept, dtype=np.int64),
        errors=errors,
        dropped=dropped,
    )


class PreferenceMethods:
    """The preference entry points of :class:`chatmask.ChatTokenizer`."""

    def tokenize_preference(self, row: Any, policy: MaskPolicy | None = None, **template_kwargs: Any) -> dict[str, Any]:
        """One preference row as numpy arrays ``prompt_input_ids``, ``chosen_input_ids``,
        ``rejected_input_ids``, ``chosen_labels``, ``rejected_labels`` (int64; labels -100 where
        not trained) and ``flags`` (reason strings, empty when the pair is exact and consistent).

        `row` is ``{"prompt": [messages], "chosen": ..., "rejected": ...}`` (a str or one dict for
        a completion is one assistant message) or ``{"chosen": [conversation], "rejected":
        [conversation]}`` sharing their opening messages. `policy` defaults to
        :data:`chatmask.preference.PREFERENCE_POLICY`. See :mod:`chatmask.preference`.
        """
        batch = tokenize_preference_batch(
            cast("ChatTokenizer", self), [row], policy, 1, "raise", "int64", template_kwargs
        )
        if not len(batch):
            raise ConversationError("the policy's overflow='drop' dropped the row")
        return batch[0]

    def tokenize_preference_batch(
        self,
        rows: Iterable[Any],
        policy: MaskPolicy | None = None,
        num_threads: int | None = None,
        on_error: str = "raise",
        ids_dtype: str = "int32",
        **template_kwargs: Any,
    ) -> PreferenceBatch:
        """Many preference rows: both branches of every row in one core batch (the GIL released),
        then split with numpy; see :class:`PreferenceBatch` and :meth:`tokenize_preference`."""
        return tokenize_preference_batch(
            cast("ChatTokenizer", self), rows, policy, num_threads, on_error, ids_dtype, template_kwargs
        )


__all__ = [
    "FIELDS",
    "FLAGS",
    "FLAGS_COLUMN",
    "PREFERENCE_POLICY",
    "PreferenceBatch",
    "PreferenceRowError",
    "PreferenceRowTypeError",
]
