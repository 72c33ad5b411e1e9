"""`ChatTokenizer`: the typed Python face of the compiled core."""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

from . import _core
from .batch import TokenizedBatch
from .errors import TokenizerError

Message = Mapping[str, Any]
Conversation = Sequence[Message]

MODES = ("last", "all", "multistep", "generation")


def _split_template_kwargs(kwargs: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """`chat_template` picks the template (as in `apply_chat_template`); the rest go to it."""
    kwargs = dict(kwargs)
    return kwargs.pop("chat_template", None), kwargs


class ChatTokenizer:
    """A tokenizer and its chat template(s), compiled once and used from any thread."""

    render_backend = "minijinja"

    def __init__(self, core: _core.ChatTokenizer) -> None:
        self._core = core

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ChatTokenizer:
        """Load a local tokenizer directory the way transformers 5 does (offline, no hub)."""
        if not os.path.isdir(path):
            raise TokenizerError(f"{os.fspath(path)!r} is not a local tokenizer directory (chatmask never downloads)")
        return cls(_core.ChatTokenizer.from_pretrained(os.fspath(path)))

    @classmethod
    def from_transformers(cls, tokenizer: Any, chat_template: str | dict[str, str] | None = None) -> ChatTokenizer:
        """Build from a transformers fast tokenizer (v4.45+ or v5).

        The backend comes from ``tokenizer.backend_tokenizer.to_str()``, not from the file on disk,
        because transformers 5 may rebuild parts of it (Qwen2's pre-tokenizer, for one).
        """
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not getattr(tokenizer, "is_fast", True):
            raise TypeError(
                f"chatmask needs a transformers *fast* tokenizer (with .backend_tokenizer), "
                f"not {type(tokenizer).__name__}"
            )
        template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        specials = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
        return cls(_core.ChatTokenizer.from_parts(backend.to_str(), template, specials))

    @classmethod
    def from_parts(
        cls,
        tokenizer_json: str,
        chat_template: str | dict[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> ChatTokenizer:
        """Build from a serialized `tokenizers` tokenizer, a template and the named special tokens."""
        return cls(_core.ChatTokenizer.from_parts(tokenizer_json, chat_template, dict(special_tokens or {})))

    @property
    def eos_token_id(self) -> int | None:
        return self._core.eos_token_id

    @property
    def special_tokens(self) -> dict[str, str]:
        return self._core.special_tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with no special tokens added."""
        return self._core.encode(text)

    def apply_chat_template(
        self,
        conversation: Conversation,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_assistant_tokens_mask: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str | list[int] | dict[str, list[int]]:
        """transformers' `apply_chat_template` with list semantics: the text, or its token ids.

        With ``return_assistant_tokens_mask=True`` it returns ``{"input_ids", "assistant_masks"}``,
        the mask from the template's ``{% generation %}`` blocks (all zeros without them), with
        transformers' two known bugs fixed: a span whose first character maps to no token no
        longer drops every later span, and a span ending in token 0 no longer marks to the end.
        """
        if return_assistant_tokens_mask:
            if not tokenize:
                raise ValueError("return_assistant_tokens_mask=True requires tokenize=True")
            ids, mask = self._core.assistant_mask(
                conversation,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                tools=tools,
                documents=documents,
                **kwargs,
            )
            return {"input_ids": ids, "assistant_masks": mask}
        text = self._core.render(
            conversation,
            add_generation_prompt=add_generation_prompt,
            chat_template=chat_template,
            tools=tools,
            documents=documents,
            **kwargs,
        )
        return self._core.encode(text) if tokenize else text

    def tokenize_for_trainer(
        self, chat: Conversation, mode: str = "last", finish_reason: str = "", **template_kwargs: Any
    ) -> dict[str, list[int]]:
        """The reference's `{"tokens", "masks"}` for one conversation.

        `mode` is ``last``, ``all``, ``multistep`` (the reference's three), or ``generation``:
        labels from the template's ``{% generation %}`` blocks.
        """
        chat_template, kwargs = _split_template_kwargs(template_kwargs)
        tokens, masks = self._core.label(
            chat,
            mode=mode,
            finish_reason="length" if finish_reason == "length" else "",
            chat_template=chat_template,
            **kwargs,
        )
        return {"tokens": tokens, "masks": masks}

    def tokenize_batch(
        self,
        conversations: Iterable[Conversation],
        mode: str = "last",
        finish_reason: str | Sequence[str | None] = "",
        num_threads: int | None = None,
        on_error: str = "raise",
        ids_dtype: str = "int32",
        **template_kwargs: Any,
    ) -> TokenizedBatch:
        """Label many conversations in parallel, the GIL released; see :class:`TokenizedBatch`."""
        chat_template, kwargs = _split_template_kwargs(template_kwargs)
        if not isinstance(conversations, (list, tuple)):
            conversations = list(conversations)
        arrays = self._core.tokenize_batch(
            conversations,
            mode=mode,
            finish_reason=finish_reason,
            num_threads=num_threads,
            on_error=on_error,
            ids_dtype=ids_dtype,
            chat_template=chat_template,
            **kwargs,
        )
        return TokenizedBatch(**arrays)
