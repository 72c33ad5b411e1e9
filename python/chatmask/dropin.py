"""Drop-in replacements for atropos' `tokenize_for_trainer` and `tokenize_for_trainer_multistep`.

Same arguments, same output (quirks included), computed by the Rust core. The core for a
transformers tokenizer is built once and cached per tokenizer object and template, so a loop of
single calls does not re-parse the tokenizer each time.

The drop-in functions keep atropos' signatures, so their encoding engine is chosen for the
process: ``CHATMASK_ENCODER`` in the environment or :func:`use_encoder` (``"auto"`` by default).
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

from ._tokenizer import ENCODERS, ChatTokenizer, Conversation, EncoderChoice

_lock = threading.Lock()
_cache: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], ChatTokenizer]] = weakref.WeakKeyDictionary()


_encoder: str = os.environ.get("CHATMASK_ENCODER", "auto")


def use_encoder(encoder: EncoderChoice) -> None:
    """Choose the engine the drop-in functions encode with (``"auto"``, ``"fast"``, ``"tokenizers"``)."""
    global _encoder
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, not {encoder!r}")
    _encoder = encoder


def _template_key(template: Any) -> Any:
    if isinstance(template, dict):
        return tuple(sorted(template.items()))
    return template


def core_for(tokenizer: Any, allow_jinja2: bool = False) -> ChatTokenizer:
    """The cached `ChatTokenizer` for a transformers tokenizer (or the argument itself).

    ``allow_jinja2`` is part of the cache key: a template minijinja cannot render exactly
    raises `TemplateError` without it, and renders with Jinja2 (under limits) with it.
    """
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    not_a_tokenizer = TypeError(
        "tokenizer must be a transformers fast tokenizer (with .backend_tokenizer) or a "
        f"chatmask.ChatTokenizer, not {type(tokenizer).__name__}"
    )
    # Duck-typed objects must also have a real backend (`to_str`) and a vocabulary size, else they
    # would fail below with an AttributeError or "has no len()" instead of this message.
    if not callable(getattr(getattr(tokenizer, "backend_tokenizer", None), "to_str", None)):
        raise not_a_tokenizer
    # The template and vocabulary size are part of the key: either can change on a live tokenizer.
    try:
        size = len(tokenizer)
    except TypeError:
        raise not_a_tokenizer from None
    encoder = _encoder
    key = (_template_key(getattr(tokenizer, "chat_template", None)), size, encoder, bool(allow_jinja2))
    with _lock:
        per_tok = _cache.get(tokenizer)
        if per_tok is not None and key in per_tok:
            return per_tok[key]
    core = ChatTokenizer.from_transformers(tokenizer, encoder=encoder, allow_jinja2=allow_jinja2)  # type: ignore[arg-type]
    with _lock:
        _cache.setdefault(tokenizer, {})[key] = core
    return core


def _with_messages(out: dict[str, Any], chat: Conversation, include_messages: bool) -> dict[str, Any]:
    if include_messages:
        out["messages"] = chat
    return out


def tokenize_for_trainer(
    tokenizer: Any,
    chat: Conversation,
    include_messages: bool = False,
    train_on_all_assistant_turns: bool = False,
    finish_reason: str = "",
    *,
    allow_jinja2: bool = False,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """atropos' `tokenize_for_trainer`: `{"tokens", "masks"}` (+ `"messages"`), exactly.

    Extra keyword arguments go to the chat template, as `apply_chat_template` passes them;
    ``allow_jinja2`` lets a template minijinja cannot render exactly render with Jinja2.
    """
    mode = "all" if train_on_all_assistant_turns else "last"
    out = core_for(tokenizer, allow_jinja2).tokenize_for_trainer(
        chat, mode=mode, finish_reason=finish_reason, **template_kwargs
    )
    return _with_messages(out, chat, include_messages)


def tokenize_for_trainer_multistep(
    tokenizer: Any,
    chat: Conversation,
    include_messages: bool = False,
    finish_reason: str = "",
    *,
    allow_jinja2: bool = False,
    **template_kwargs: Any,
) -> dict[str, Any]:
    """atropos' `tokenize_for_trainer_multistep`: only the last assistant/agent turn is trained."""
    out = core_for(tokenizer, allow_jinja2).tokenize_for_trainer(
        chat, mode="multistep", finish_reason=finish_reason, **template_kwargs
    )
    return _with_messages(out, chat, include_messages)
