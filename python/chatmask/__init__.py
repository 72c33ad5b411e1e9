"""chatmask: chat conversations to training arrays, exactly and fast.

``tokenize_for_trainer`` / ``tokenize_for_trainer_multistep`` are drop-ins for atropos'
functions; :class:`ChatTokenizer` is the compiled core with single and batch APIs.
"""

from . import _unicode, demo
from ._core import __version__
from ._tokenizer import ChatTokenizer
from .batch import TokenizedBatch
from .dropin import tokenize_for_trainer, tokenize_for_trainer_multistep
from .errors import (
    ChatMaskError,
    ConversationError,
    ConversationTypeError,
    RolloutError,
    SequenceTooLongError,
    SpanError,
    TemplateError,
    TemplateLimitError,
    TemplateSyntaxError,
    TokenizerError,
)
from .limits import RenderLimits
from .pack import PackedBatch, pack
from .policy import MaskPolicy
from .preference import PreferenceBatch
from .rollout import RolloutBatch, RolloutTurn

# Templates' str methods follow this Python's Unicode data (see _unicode.py), for every
# tokenizer, however it was built.
_unicode.install()

__all__ = [
    "ChatMaskError",
    "ChatTokenizer",
    "ConversationError",
    "ConversationTypeError",
    "MaskPolicy",
    "PackedBatch",
    "PreferenceBatch",
    "RenderLimits",
    "RolloutBatch",
    "RolloutError",
    "RolloutTurn",
    "SequenceTooLongError",
    "SpanError",
    "TemplateError",
    "TemplateLimitError",
    "TemplateSyntaxError",
    "TokenizedBatch",
    "TokenizerError",
    "__version__",
    "demo",
    "pack",
    "tokenize_for_trainer",
    "tokenize_for_trainer_multistep",
]


def __getattr__(name: str):
    # The ecosystem adapters load on first use (`chatmask.datasets.map_fn`, `chatmask.ray_data`):
    # neither imports its framework, but there is no need to load them with every `import chatmask`.
    if name in ("datasets", "ray_data"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
