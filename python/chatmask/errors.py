"""The exceptions chatmask raises. Every one derives from :class:`ChatMaskError`.

Errors about a row of a batch name the row in their message and carry it as ``.row``.
"""

from __future__ import annotations


class ChatMaskError(Exception):
    """Base class of every chatmask error."""

    row: int | None = None


class TemplateError(ChatMaskError, ValueError):
    """The chat template failed while rendering, or called ``raise_exception``."""


class TemplateSyntaxError(TemplateError):
    """The chat template does not compile; the message gives the line."""


class TemplateLimitError(TemplateError):
    """The chat template exceeded a render limit (fuel, recursion depth, output size).

    See :class:`chatmask.RenderLimits`; a template that hits one is usually hostile or broken.
    """


class ConversationError(ChatMaskError, ValueError):
    """The conversation cannot be labelled (empty prefix, missing role, failed broadcast)."""


class SequenceTooLongError(ConversationError):
    """A row is longer than ``MaskPolicy.max_length`` and the policy may not cut it
    (``overflow="error"``, or a trained span that alone exceeds the limit)."""


class SpanError(ConversationError):
    """No exact method could locate a message's text in the render (see ``MaskPolicy``)."""


class RolloutError(ConversationError):
    """Sampled ids that do not fit their message: they decode to other text than the template
    renders there, or no token boundary lies where the message's text ends."""


class ConversationTypeError(ChatMaskError, TypeError):
    """The conversation, a message or a value in it has the wrong type."""


class TokenizerError(ChatMaskError, ValueError):
    """A tokenizer could not be loaded or used."""


__all__ = [
    "ChatMaskError",
    "ConversationError",
    "ConversationTypeError",
    "SequenceTooLongError",
    "RolloutError",
    "SpanError",
    "TemplateError",
    "TemplateLimitError",
    "TemplateSyntaxError",
    "TokenizerError",
]
