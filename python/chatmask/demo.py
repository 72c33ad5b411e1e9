"""The offline demo: a small tokenizer trained on the fly and conversations shipped in the package.

Used by ``chatmask demo`` (the README's first command), the examples and the core test suite, so
nothing needs model files or a network.
"""

from __future__ import annotations

import json
from typing import Any

from . import _core
from ._tokenizer import ChatTokenizer, EncoderChoice


def demo_conversations() -> list[dict[str, Any]]:
    """Rows ``{"id", "messages", "tools"?}`` covering multi-turn, tools, reasoning and unicode."""
    return json.loads(_core.DEMO_CONVERSATIONS_JSON)


def demo_tokenizer_json(kind: str = "bytelevel") -> str:
    """The demo tokenizer's ``tokenizer.json``: ``"bytelevel"`` (Qwen/Llama 3 style) or ``"metaspace"`` (Mistral style)."""
    return _core.demo_tokenizer_json(kind)


def demo_chat_template() -> str:
    return _core.DEMO_CHAT_TEMPLATE


def demo_tokenizer(kind: str = "bytelevel", encoder: EncoderChoice = "auto") -> ChatTokenizer:
    """A `ChatTokenizer` for the demo tokenizer and template."""
    specials = {"eos_token": _core.DEMO_EOS_TOKEN}
    return ChatTokenizer.from_parts(demo_tokenizer_json(kind), demo_chat_template(), specials, encoder=encoder)
