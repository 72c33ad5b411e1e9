"""Preference rows read into two branch conversations and the prompt's length (see
:mod:`chatmask.preference`)."""

from __future__ import annotations

from typing import Any, Mapping

from .errors import ConversationError, ConversationTypeError
from .policy import MaskPolicy


class PreferenceRowError(ConversationError):
    """A preference row has a shape chatmask cannot read as a pair (the message says why)."""


class PreferenceRowTypeError(ConversationTypeError):
    """A preference row, or a part of it, has the wrong type."""


def _completion(value: Any, name: str) -> list[Any]:
    """An explicit row's `chosen`/`rejected`: a str or one message dict is one assistant message."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, (list, tuple)):
        if not value:
            raise PreferenceRowError(f"{name!r} is an empty list: a completion needs at least one message")
        return list(value)
    raise PreferenceRowTypeError(
        f"{name!r} must be a str, a message dict or a list of messages, not {type(value).__name__}"
    )


def _messages(value: Any, name: str) -> list[Any]:
    if not isinstance(value, (list, tuple)):
        raise PreferenceRowTypeError(f"{name!r} must be a list of message dicts, not {type(value).__name__}")
    if not value:
        raise PreferenceRowError(f"{name!r} is an empty list")
    return list(value)


def _shaped(policy: MaskPolicy, row: Mapping[str, Any], messages: list[Any]) -> tuple[list[dict[str, Any]], Any]:
    """`messages` shaped by the policy as a row holding them would be (system field, tools)."""
    shaped: dict[str, Any] = {policy.field_messages: messages}
    for key in (policy.field_tools, policy.field_system):
        if key is not None and key in row:
            shaped[key] = row[key]
    try:
        return policy.shape(shaped)
    except TypeError as e:
        raise PreferenceRowTypeError(str(e)) from None
    except (KeyError, ValueError) as e:
        raise PreferenceRowError(e.args[0] if e.args else str(e)) from None


def _common_prefix(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def read_row(row: Any, policy: MaskPolicy) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int, Any]:
    """`(chosen, rejected, prompt_length, tools)`: both branches as whole shaped conversations,
    sharing their first `prompt_length` messages; each completion starts with an assistant message.

    Explicit rows are ``{"prompt": [...], "chosen": ..., "rejected": ...}``; implicit rows are
    ``{"chosen": [...], "rejected": [...]}``, the prompt being their longest common prefix.
    """
    if not isinstance(row, Mapping):
        raise PreferenceRowTypeError(f"a preference row must be a dict, not {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise PreferenceRowError(
            f"a preference row needs 'chosen' and 'rejected' (and optionally 'prompt'); missing {missing}, "
            f"found keys {sorted(map(str, row))}"
        )
    if row["chosen"] == row["rejected"]:
        raise PreferenceRowError("'chosen' and 'rejected' are the same conversation: no preference to learn")
    if "prompt" in row:
        prompt = _messages(row["prompt"], "prompt")
        chosen_part = _completion(row["chosen"], "chosen")
        rejected_part = _completion(row["rejected"], "rejected")
        chosen, tools = _shaped(policy, row, prompt + chosen_part)
        rejected, _ = _shaped(policy, row, prompt + rejected_part)
        # Shaping maps messages one to one, except a system message it adds or drops at the front.
        n_prompt = len(chosen) - len(chosen_part)
        if n_prompt != len(rejected) - len(rejected_part) or n_prompt < 1:
            raise PreferenceRowError("the prompt has no message left once the policy shaped it")
    else:
        chosen, tools = _shaped(policy, row, _messages(row["chosen"], "chosen"))
        rejected, _ = _shaped(policy, row, _messages(row["rejected"], "rejected"))
        n_prompt = _common_prefix(chosen, rejected)
        if n_prompt == 0:
            raise PreferenceRowError(
                "'chosen' and 'rejected' share no opening message: an implicit row's prompt is their common prefix"
            )
        if n_prompt in (len(chosen), len(rejected)):
            shorter = "chosen" if n_prompt == len(chosen) else "rejected"
            raise PreferenceRowError(f"{shorter!r} is a prefix of the other branch: it has no completion of its own")
    for name, branch in (("chosen", chosen), ("rejected", rejected)):
        if n_prompt >= len(branch):
            raise PreferenceRowError(f"{name!r} has no completion after the prompt")
        role = branch[n_prompt].get("role")
        if role != "assistant":
            raise PreferenceRowError(
                f"the {name} completion starts with a {role!r} message (message {n_prompt}); "
                "the prompt must end before an assistant completion"
            )
    return chosen, rejected, n_prompt, tools
