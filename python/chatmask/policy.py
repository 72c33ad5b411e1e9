"""`MaskPolicy`: which tokens to train, decided on exact character spans of each message.

The policy has two halves. Dataset shaping (`field_messages`, the role map, property mappings,
`drop_system_message`, `split_thinking`) turns a dataset row into chat messages, in Python,
the way axolotl's chat-template strategy reads rows. Labelling (roles, end-of-turn tokens,
per-message overrides, reasoning, length limits) runs in the Rust core on the spans of one
render (see the README, "Training policies").
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Literal, Mapping, Sequence

import numpy as np

EndTokens = Literal["none", "turn", "all", "last"]
Overflow = Literal["error", "drop", "truncate_left", "truncate_right"]

_END_TOKENS = ("none", "turn", "all", "last")
_OVERFLOW = ("error", "drop", "truncate_left", "truncate_right")

#: axolotl's default role map: dataset role name -> chat template role.
DEFAULT_ROLES: Mapping[str, Sequence[str]] = {
    "user": ("user", "human"),
    "assistant": ("assistant", "gpt", "model"),
    "system": ("system",),
    "tool": ("tool",),
}

#: The (open, close) tags `split_thinking` recognises, as axolotl does.
THINKING_PAIRS = (
    ("<think>", "</think>"),
    ("<reasoning>", "</reasoning>"),
    ("<|begin_of_thought|>", "<|end_of_thought|>"),
)
_SOLUTION_PAIRS = (("<|begin_of_solution|>", "<|end_of_solution|>"),)


@dataclasses.dataclass(frozen=True)
class MaskPolicy:
    """What `ChatTokenizer.tokenize` trains. Every field has axolotl's name and meaning where
    axolotl has one; see the README table.

    Labelling:
        roles_to_train: roles whose messages are trained (dataset names like ``gpt`` map
            through `roles`).
        train_on_inputs: train every message, whatever its role.
        train_on_eot / train_on_eos: ``"none"``, ``"turn"`` (the end token of each trained
            message), ``"all"`` (of every message) or ``"last"`` (only the last one). A
            message's end token is the first end-of-turn token after its last field and before
            the next message, found on the spans. `train_on_eos` rules tokens equal to the
            tokenizer's eos token, `train_on_eot` the others; `train_on_eot=None` (the
            default) takes `train_on_eos`'s value, as axolotl does.
        eot_tokens: end-of-turn token strings; ``None`` takes the first special added token
            after each message (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``[/INST]``) that is
            not part of the generation prompt (``<|im_start|>`` opens turns, never ends one).
        train_reasoning: train a message's reasoning (``reasoning_content``/``thinking``) and
            the template text up to its next field (``</think>``).
        train_turn_prefix: give a message the template text between the generation prompt
            and its first field, which the model writes too: a ``<tool_call>`` opener, Qwen3's
            ``<think>`` tags. The generation prompt is what ``add_generation_prompt=True``
            appends to a one-message conversation; without one (Mistral's is empty) a
            message starts at its first field.
        message_field_training / message_field_training_detail: names of the per-message
            override fields: a boolean, and a list of ``{begin_offset, end_offset, train}``
            character ranges of the content (``end_offset`` inclusive, as in axolotl).
        sanitize_control_tokens: encode control-token text in the inputs (``<|im_start|>``
            typed by a user) as text, exactly as transformers 5's ``apply_chat_template(...,
            sanitize_control_tokens=True)``. Rows holding such text are counted either way
            (``control_tokens_in_input``; the CLI manifest's ``rows_with_control_tokens``).
        source: ``"messages"`` (spans of message fields) or ``"generation"`` (the template's
            ``{% generation %}`` blocks, with ``message_index`` from the message spans).

    Length:
        max_length: tokens per row; ``None`` for no limit.
        overflow: ``"error"`` (raise :class:`chatmask.SequenceTooLongError`), ``"drop"`` (the
            row is left out and listed), ``"truncate_right"``, or ``"truncate_left"`` (keep the
            last trained message whole, cut context from the left; a target longer than
            `max_length` on its own raises, it is never cut).

    Dataset shape (applied in Python before labelling):
        field_messages: the row key holding the messages (rows may also be plain lists).
        field_system: a row key holding a system prompt to put first when the messages do not
            start with one.
        field_tools: the row key holding the row's tools, passed to the template.
        roles: template role -> the dataset role names mapped to it (ShareGPT's ``human`` and
            ``gpt`` included by default).
        message_property_mappings: template field -> dataset field (``{"role": "from",
            "content": "value"}`` for ShareGPT). Unmapped fields are kept as they are. A message
            without ``role`` but with ``from``/``value`` is read as ShareGPT.
        drop_system_message: drop a leading system message.
        split_thinking: move ``<think>…</think>`` (and axolotl's other pairs) out of assistant
            content into ``reasoning_content``.
    """

    roles_to_train: Sequence[str] = ("assistant",)
    train_on_inputs: bool = False
    train_on_eot: EndTokens | None = None
    train_on_eos: EndTokens = "turn"
    eot_tokens: Sequence[str] | None = None
    train_reasoning: bool = True
    train_turn_prefix: bool = True
    message_field_training: str = "training"
    message_field_training_detail: str = "training_detail"
    source: Literal["messages", "generation"] = "messages"
    sanitize_control_tokens: bool = False
    max_length: int | None = None
    overflow: Overflow = "error"
    field_messages: str = "messages"
    field_system: str | None = None
    field_tools: str = "tools"
    roles: Mapping[str, Sequence[str]] | None = None
    message_property_mappings: Mapping[str, str] | None = None
    drop_system_message: bool = False
    split_thinking: bool = False

    def __post_init__(self) -> None:
        # This dataclass is the one place the options, their types and their defaults are
        # declared and checked: the core takes `to_core()` as given, with no defaults of its own.
        if isinstance(self.roles_to_train, str):
            raise TypeError("roles_to_train must be a list of role names, not a str")
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, not {type(value).__name__}")
            object.__setattr__(self, name, bool(value))
        for name, optional in _STR_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, str) and not (value is None and optional):
                raise TypeError(f"{name} must be a str, not {type(value).__name__}")
        if self.train_on_eot is None:
            object.__setattr__(self, "train_on_eot", self.train_on_eos)  # axolotl's fallback
        for name in ("train_on_eot", "train_on_eos"):
            if getattr(self, name) not in _END_TOKENS:
                raise ValueError(f"{name} must be one of {_END_TOKENS}, not {getattr(self, name)!r}")
        if self.overflow not in _OVERFLOW:
            raise ValueError(f"overflow must be one of {_OVERFLOW}, not {self.overflow!r}")
        if self.source not in ("messages", "generation"):
            raise ValueError(f"source must be 'messages' or 'generation', not {self.source!r}")
        if self.max_length is not None:
            try:
                length = operator.index(self.max_length)  # numpy integers too
            except TypeError:
                length = 0
            if isinstance(self.max_length, bool) or length < 1:
                raise ValueError(f"max_length must be a positive int or None, not {self.max_length!r}")
            object.__setattr__(self, "max_length", length)
        object.__setattr__(self, "roles_to_train", _strings("roles_to_train", self.roles_to_train))
        if self.eot_tokens is not None:
            if isinstance(self.eot_tokens, str):
                raise TypeError("eot_tokens must be a list of token strings, not a str")
            object.__setattr__(self, "eot_tokens", _strings("eot_tokens", self.eot_tokens))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> MaskPolicy:
        """A policy from a dict (a JSON/YAML file); unknown keys are an error, not ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown MaskPolicy fields {unknown}; known: {sorted(names)}")
        return cls(**dict(config))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_core(self) -> dict[str, Any]:
        """The labelling half, as the Rust core takes it: every key, validated and normalised
        (the core reads each one and refuses a missing or an unknown key)."""
        return {
            # Dataset role names map to template roles, as messages' roles do (axolotl too).
            "roles_to_train": [self._role_lookup().get(r, r) for r in self.roles_to_train],
            "train_on_inputs": self.train_on_inputs,
            "train_on_eot": self.train_on_eot,
            "train_on_eos": self.train_on_eos,
            "eot_tokens": None if self.eot_tokens is None else list(self.eot_tokens),
            "train_reasoning": self.train_reasoning,
            "train_turn_prefix": self.train_turn_prefix,
            "field_training": self.message_field_training,
            "field_training_detail": self.message_field_training_detail,
            "max_length": self.max_length,
            "overflow": self.overflow,
            "source": self.source,
            "sanitize_control_tokens": self.sanitize_control_tokens,
        }

    # --- dataset shaping -------------------------------------------------------------------

    def shape_spec(self) -> dict[str, Any] | None:
        """:meth:`shape` as the core applies it to rows it read itself (``chatmask.rows.CoreRow``);
        None when only Python shapes (``split_thinking``)."""
        if self.split_thinking:
            return None
        mappings = self.message_property_mappings
        return {
            "role_lookup": list(self._role_lookup().items()),
            "mappings": None if mappings is None else list(mappings.items()),
            "drop_system_message": self.drop_system_message,
        }

    def _role_lookup(self) -> dict[str, str]:
        lookup: dict[str, str] = {}
        for role, names in (self.roles or DEFAULT_ROLES).items():
            for name in [names] if isinstance(names, str) else names:
                lookup[name] = role
        return lookup

    def shape(self, row: Any, row_index: int | None = None) -> tuple[list[dict[str, Any]], Any]:
        """A dataset row (a mapping, or a list of messages) as `(messages, tools)`."""
        where = "" if row_index is None else f"row {row_index}: "
        tools = None
        system = None
        if isinstance(row, Mapping):
            if self.field_messages not in row:
                raise KeyError(f"{where}no {self.field_messages!r} field (MaskPolicy.field_messages)")
            raw = row[self.field_messages]
            tools = row.get(self.field_tools)
            if self.field_system is not None:
                system = row.get(self.field_system)
        else:
            raw = row
        if raw is None or isinstance(raw, (str, bytes, Mapping)):
            raise TypeError(f"{where}messages must be a list of message dicts, not {type(raw).__name__}")
        lookup = self._role_lookup()
        messages = [self._message(m, lookup, where, i) for i, m in enumerate(raw)]
        if system and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": system})  # as axolotl: only if none
        if self.drop_system_message and messages and messages[0].get("role") == "system":
            messages = messages[1:]
        return messages, tools

    def _message(self, message: Any, lookup: Mapping[str, str], where: str, index: int) -> dict[str, Any]:
        if not isinstance(message, Mapping):
            raise TypeError(f"{where}message {index} is a {type(message).__name__}, not a dict")
        mappings = self.message_property_mappings
        if mappings is None and "role" not in message and "from" in message:
            mappings = {"role": "from", "content": "value"}  # ShareGPT
        out = dict(message)
        if mappings:
            sources = set(mappings.values())
            out = {k: v for k, v in message.items() if k not in sources}
            for key, source in mappings.items():
                if message.get(source) is not None:
                    out[key] = message[source]
        role = out.get("role")
        if isinstance(role, str):
            out["role"] = lookup.get(role, role)
        if self.split_thinking and out.get("role") == "assistant" and isinstance(out.get("content"), str):
            _split_thinking(out)
        return out


def _split_thinking(message: dict[str, Any]) -> None:
    """axolotl's `split_thinking`: the first thinking pair's text becomes `reasoning_content`."""
    content = message["content"]
    for open_tag, close_tag in THINKING_PAIRS:
        if open_tag in content and close_tag in content:
            start, end = content.find(open_tag), content.find(close_tag)
            message["reasoning_content"] = content[start + len(open_tag) : end].strip()
            remainder = content[end + len(close_tag) :].lstrip()
            for c_open, c_close in _SOLUTION_PAIRS:
                if c_open in remainder and c_close in remainder:
                    remainder = remainder[remainder.find(c_open) + len(c_open) : remainder.find(c_close)].strip()
                    break
            message["content"] = remainder
            return


# The plain-typed fields, read off the annotations above (strings, under `from __future__ import
# annotations`) so a new field's type is declared once; test_policy checks each kind is refused.
_BOOL_FIELDS = tuple(f.name for f in dataclasses.fields(MaskPolicy) if f.type == "bool")
_STR_FIELDS = {
    f.name: f.type == "str | None" for f in dataclasses.fields(MaskPolicy) if f.type in ("str", "str | None")
}


def _strings(name: str, values: Sequence[str]) -> tuple[str, ...]:
    out = tuple(values)
    for value in out:
        if not isinstance(value, str):
            raise TypeError(f"{name} must hold str values, not {type(value).__name__}")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
