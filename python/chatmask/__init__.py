"""chatmask: chat conversations to training arrays, exactly and fast.

``tokenize_for_trainer`` / ``tokenize_for_trainer_multistep`` are drop-ins for atropos'
functions; :class:`ChatTokenizer` is the compiled core with single and batch APIs.
"""

from . import demo
from ._core import __version__
from ._tokenizer import ChatTokenizer
from .batch import TokenizedBatch
from .dropin import tokenize_for_trainer, tokenize_for_trainer_multistep
from .errors import (
    ChatMaskError,
    ConversationError,
    ConversationTypeError,
    TemplateError,
    TemplateLimitError,
    TemplateSyntaxError,
    TokenizerError,
)
from .limits import RenderLimits

__all__ = [
    "ChatMaskError",
    "ChatTokenizer",
    "ConversationError",
    "ConversationTypeError",
    "RenderLimits",
    "TemplateError",
    "TemplateLimitError",
    "TemplateSyntaxError",
    "TokenizedBatch",
    "TokenizerError",
    "__version__",
    "demo",
    "tokenize_for_trainer",
    "tokenize_for_trainer_multistep",
]
