"""`ChatTokenizer`: the typed Python face of the compiled core."""

from __future__ import annotations

import os
import sys
import warnings
from collections import OrderedDict
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np

from . import _core
from ._batch_paths import tokenize_policy_batch, tokenize_reference_batch
from ._fallback import JinjaRenderer, open_jinja2, why_not_native
from ._recipe import read_tokenizer_files, restore
from .batch import TokenizedBatch
from .errors import ChatMaskError, SequenceTooLongError, TemplateError, TemplateLimitError, TokenizerError
from .limits import RenderLimits
from .policy import MaskPolicy
from .preference import PreferenceMethods
from .rollout import RolloutMethods

Message = Mapping[str, Any]
Conversation = Sequence[Message]

MODES = ("last", "all", "multistep", "generation")

# The encoding engines a constructor may ask for (see `ChatTokenizer.from_pretrained`).
EncoderChoice = Literal["auto", "fast", "tokenizers"]
ENCODERS: tuple[EncoderChoice, ...] = ("auto", "fast", "tokenizers")


def _split_template_kwargs(kwargs: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """`chat_template` picks the template (as in `apply_chat_template`); the rest go to it."""
    kwargs = dict(kwargs)
    return kwargs.pop("chat_template", None), kwargs


DEFAULT_VERIFY = 8
# Template sources whose route (native, or refused) is remembered; the Jinja2 ones are all kept.
_MAX_ROUTES = 64


class ChatTokenizer(PreferenceMethods, RolloutMethods):
    """A tokenizer and its chat template(s), compiled once and used from any thread.

    Templates render natively (minijinja). A template minijinja cannot render exactly (it cannot
    compile it, it has a construct minijinja renders differently, or its native render differs
    from Jinja2 on one of the first `verify` conversations, checked only when transformers is
    already imported) raises `TemplateError`, unless ``allow_jinja2=True``: then it renders
    through transformers' Jinja2 environment, with a warning and under limits equivalent to
    `render_limits`. `render_backend` says which path the default template takes.
    Preference pairs: `tokenize_preference` / `tokenize_preference_batch` (:mod:`chatmask.preference`);
    RL rollouts: `tokenize_rollout` / `tokenize_rollout_batch` / `tokenize_group` (:mod:`chatmask.rollout`).
    """

    def __init__(self, core: _core.ChatTokenizer, verify: int = DEFAULT_VERIFY, allow_jinja2: bool = False) -> None:
        self._core = core
        self._fallback: dict[str, JinjaRenderer] = {}
        # How each template source renders, decided once (bounded): None is native, an error
        # is a template that needs Jinja2 without the opt-in (raised again on every use).
        self._routes: OrderedDict[str, TemplateError | None] = OrderedDict()
        self._allow_jinja2 = bool(allow_jinja2)
        self._verify_left = verify
        self._verify_initial = verify
        # How to build this tokenizer again in another process (see __reduce__); set by from_*.
        self._recipe: tuple[Any, ...] | None = None
        for source in core.template_sources():
            self._renderer_for(source)
        fallback = core.encoder_fallback
        if fallback is not None and fallback[1]:
            warnings.warn(f"chatmask encodes with the tokenizers crate: {fallback[0]}", stacklevel=3)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the inputs it was built from, so it crosses processes and machines.

        A `from_pretrained` tokenizer carries the bytes of the files it was loaded from (not the
        path, which may not exist on another machine), `from_parts` / `from_transformers` ones the
        tokenizer JSON, template(s) and special tokens. Templates that took the Jinja2 path come
        along, so the copy renders the way this one does; so do the render limits and
        `allow_jinja2`. The pickle is a pure function of those inputs (deterministic, which
        `datasets` fingerprinting needs).
        """
        if self._recipe is None:
            raise TypeError(
                "this ChatTokenizer was built from a raw core and cannot be pickled; build it with "
                "ChatTokenizer.from_pretrained, from_parts or from_transformers"
            )
        limits = tuple(self._core.render_limits())
        state = (
            type(self),
            self._recipe,
            self._verify_initial,
            tuple(sorted(self._fallback)),
            limits,
            self._allow_jinja2,
        )
        return (restore, state)

    @property
    def render_backend(self) -> str:
        """``"minijinja"`` or ``"jinja2"`` (only with ``allow_jinja2=True``) for the default template."""
        try:
            source = self._core.template_source()
        except ChatMaskError:
            return "minijinja"
        return "jinja2" if source in self._fallback else "minijinja"

    @property
    def allow_jinja2(self) -> bool:
        """Whether templates minijinja cannot render exactly may render with Jinja2 (under limits)."""
        return self._allow_jinja2

    def _renderer_for(self, source: str, reason: str | None = None) -> JinjaRenderer | None:
        """The Jinja2 renderer if `source` must take that path, else None (native); decided once.

        A template that needs Jinja2 without ``allow_jinja2=True`` raises `TemplateError`.
        """
        if source in self._fallback:
            return self._fallback[source]
        error = None
        if reason is None:
            if source in self._routes:
                self._routes.move_to_end(source)
                refused = self._routes[source]
                if refused is not None:
                    raise type(refused)(*refused.args)
                return None
            reason, error = why_not_native(self._core, source)
            if reason is None:
                self._remember(source, None)
                return None
        try:
            renderer = open_jinja2(
                source, self.special_tokens, self._core.render_limits, reason, self._allow_jinja2, error
            )
        except TemplateError as e:
            self._remember(source, e)
            raise
        self._routes.pop(source, None)
        self._fallback[source] = renderer
        return renderer

    def _remember(self, source: str, route: TemplateError | None) -> None:
        self._routes[source] = route
        if len(self._routes) > _MAX_ROUTES:
            self._routes.popitem(last=False)

    def _verify(self, chat: Conversation, source: str, kwargs: dict[str, Any]) -> JinjaRenderer | None:
        """Renders `chat` both ways while verification lasts; on a difference, switch to Jinja2
        (with ``allow_jinja2``; without it, raise). Jinja2 renders under the same limits."""
        if self._verify_left <= 0 or "transformers" not in sys.modules:
            return None
        self._verify_left -= 1
        try:
            exact = JinjaRenderer(source, self.special_tokens, self._core.render_limits)
        except Exception:
            return None
        for generation_prompt in (False, True):
            try:
                ours = self._core.render(chat, add_generation_prompt=generation_prompt, chat_template=source, **kwargs)
            except TemplateLimitError:
                return None  # a runaway template: nothing to compare
            except TemplateError:
                ours = None
            except ChatMaskError:
                return None  # bad input, not a template difference: the caller raises it
            try:
                theirs = exact.render(chat, add_generation_prompt=generation_prompt, **kwargs)
            except TemplateLimitError:
                return None  # the two paths count work differently: no verdict
            except Exception:
                theirs = None
            if ours != theirs:
                self._routes.pop(source, None)
                return self._renderer_for(
                    source, "its minijinja render differed from Jinja2 on a verified conversation"
                )
        return None

    def _route(self, chat: Conversation, chat_template: str | None, kwargs: dict[str, Any]) -> JinjaRenderer | None:
        source = self._core.template_source(chat_template, kwargs.get("tools") is not None)
        renderer = self._renderer_for(source)
        if renderer is None and self._verify_left > 0:
            renderer = self._verify(chat, source, kwargs)
        return renderer

    @property
    def encoder_backend(self) -> str:
        """``"fast"`` (chatmask's exact fast engine) or ``"tokenizers"`` (the reference crate)."""
        return self._core.encoder_backend

    @property
    def encoder_fallback_reason(self) -> str | None:
        """Why the ``tokenizers`` crate encodes (an unsupported component, the self-check, or the choice)."""
        fallback = self._core.encoder_fallback
        return None if fallback is None else fallback[0]

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        verify: int = DEFAULT_VERIFY,
        allow_jinja2: bool = False,
        encoder: EncoderChoice = "auto",
    ) -> ChatTokenizer:
        """Load a local tokenizer directory the way transformers 5 does (offline, no hub).

        ``encoder``: ``"auto"`` (the fast engine where the load-time gate shows it exact),
        ``"fast"`` (that engine or a :class:`TokenizerError` naming what stops it) or
        ``"tokenizers"`` (always the reference crate).
        """
        if not os.path.isdir(path):
            raise TokenizerError(f"{os.fspath(path)!r} is not a local tokenizer directory (chatmask never downloads)")
        files = read_tokenizer_files(os.fspath(path))
        tok = cls(_core.ChatTokenizer.from_pretrained(os.fspath(path), encoder), verify, allow_jinja2)
        tok._recipe = ("files", files, encoder)
        return tok

    @classmethod
    def from_transformers(
        cls,
        tokenizer: Any,
        chat_template: str | dict[str, str] | None = None,
        verify: int = DEFAULT_VERIFY,
        allow_jinja2: bool = False,
        encoder: EncoderChoice = "auto",
    ) -> ChatTokenizer:
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
        return cls.from_parts(backend.to_str(), template, specials, verify, allow_jinja2, encoder)

    @classmethod
    def from_parts(
        cls,
        tokenizer_json: str,
        chat_template: str | dict[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        verify: int = DEFAULT_VERIFY,
        allow_jinja2: bool = False,
        encoder: EncoderChoice = "auto",
    ) -> ChatTokenizer:
        """Build from a serialized `tokenizers` tokenizer, a template and the named special tokens."""
        specials = dict(special_tokens or {})
        tok = cls(
            _core.ChatTokenizer.from_parts(tokenizer_json, chat_template, specials, encoder), verify, allow_jinja2
        )
        template = dict(chat_template) if isinstance(chat_template, Mapping) else chat_template
        tok._recipe = ("parts", tokenizer_json, template, specials, encoder)
        return tok

    @property
    def render_limits(self) -> RenderLimits:
        """The :class:`RenderLimits` native renders run under; assign a new one to change them."""
        return RenderLimits(*self._core.render_limits())

    @render_limits.setter
    def render_limits(self, limits: RenderLimits) -> None:
        if not isinstance(limits, RenderLimits):
            raise TypeError(f"render_limits must be a chatmask.RenderLimits, not {type(limits).__name__}")
        self._core.set_render_limits(limits.fuel, limits.max_recursion, limits.max_output_bytes)

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
        sanitize_control_tokens: bool = False,
        **kwargs: Any,
    ) -> str | list[int] | dict[str, list[int]]:
        """transformers' `apply_chat_template` with list semantics: the text, or its token ids.

        With ``return_assistant_tokens_mask=True`` it returns ``{"input_ids", "assistant_masks"}``,
        the mask from the template's ``{% generation %}`` blocks (all zeros without them), with
        transformers' two known bugs fixed: a span whose first character maps to no token no
        longer drops every later span, and a span ending in token 0 no longer marks to the end.
        """
        if sanitize_control_tokens:
            # transformers 5: control-token text in the inputs is encoded as text.
            if not tokenize or return_assistant_tokens_mask:
                raise ValueError(
                    "`sanitize_control_tokens=True` requires `tokenize=True` and is not compatible with "
                    "`return_assistant_tokens_mask=True`."
                )
            self._require_native(conversation, chat_template, {**kwargs, "tools": tools})
            return self._core.encode_sanitized(
                conversation,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                tools=tools,
                documents=documents,
                **kwargs,
            )
        kwargs = {**kwargs, "tools": tools, "documents": documents}
        renderer = self._route(conversation, chat_template, kwargs)
        if renderer is not None:
            if return_assistant_tokens_mask:
                if not tokenize:
                    raise ValueError("return_assistant_tokens_mask=True requires tokenize=True")
                text, spans = renderer.render_with_spans(conversation, add_generation_prompt, **kwargs)
                ids, mask = self._core.mask_from_spans(text, spans)
                return {"input_ids": ids, "assistant_masks": mask}
            text = renderer.render(conversation, add_generation_prompt, **kwargs)
            return self._core.encode(text) if tokenize else text
        del kwargs["tools"], kwargs["documents"]
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
        finish = "length" if finish_reason == "length" else ""
        renderer = self._route(chat, chat_template, kwargs)
        if renderer is None:
            tokens, masks = self._core.label(
                chat, mode=mode, finish_reason=finish, chat_template=chat_template, **kwargs
            )
        elif mode == "generation":
            text, spans = renderer.render_with_spans(chat, False, **kwargs)
            tokens, mask = self._core.mask_from_spans(text, spans)
            masks = [t if m else -100 for t, m in zip(tokens, mask)]
            if finish and tokens and tokens[-1] == self.eos_token_id:
                tokens, masks = tokens[:-1], masks[:-1]
        else:

            def render(n: int, add_generation_prompt: bool) -> str:
                return renderer.render(chat[:n], add_generation_prompt, **kwargs)

            tokens, masks = self._core.label_with(chat, render, mode=mode, finish_reason=finish)
        return {"tokens": tokens, "masks": masks}

    def tokenize(
        self, conversation: Conversation | Mapping[str, Any], policy: MaskPolicy | None = None, **template_kwargs: Any
    ) -> dict[str, Any] | None:
        """Tokens, labels and per-token ``message_index`` of one conversation under `policy`.

        `conversation` is a list of messages or a dataset row (see :class:`MaskPolicy` for how
        rows are read). Returns numpy arrays ``input_ids`` (int64), ``labels`` (int64, -100 where
        not trained) and ``message_index`` (int32, -1 for template text), and
        ``span_method`` (``"one_render"``, ``"per_field"`` or ``"diff"``), ``straddling`` (trained
        tokens that also cover template text), ``positions_derived`` and ``truncated``. Returns
        None when ``overflow="drop"`` drops the row.
        """
        policy = policy or MaskPolicy()
        chat_template, kwargs = _split_template_kwargs(template_kwargs)
        messages, tools = policy.shape(conversation)
        if tools is not None and "tools" not in kwargs:
            kwargs["tools"] = tools
        self._require_native(messages, chat_template, kwargs)
        return self._core.tokenize(messages, policy.to_core(), chat_template=chat_template, **kwargs)

    def tokenize_continuation(
        self,
        context_messages: Conversation,
        continuation: str,
        max_length: int | None = None,
        **template_kwargs: Any,
    ) -> dict[str, Any]:
        """Context rendered with the generation prompt, `continuation` appended, and only the
        continuation trained, as context-frozen training builds examples.

        The two parts are encoded separately (the continuation's tokens do not depend on the
        context). With `max_length`, context tokens are removed from the left; a continuation
        longer than `max_length` on its own raises :class:`SequenceTooLongError`.
        ``message_index`` gives the continuation ``len(context_messages)``.
        """
        chat_template, kwargs = _split_template_kwargs(template_kwargs)
        if not isinstance(continuation, str):
            raise TypeError(f"continuation must be a str, not {type(continuation).__name__}")
        messages, tools = MaskPolicy().shape(context_messages)
        if tools is not None and "tools" not in kwargs:
            kwargs["tools"] = tools
        self._require_native(messages, chat_template, kwargs)
        context_only = MaskPolicy(roles_to_train=(), train_on_eot="none", train_on_eos="none").to_core()
        context = self._core.tokenize(
            messages, context_only, add_generation_prompt=True, chat_template=chat_template, **kwargs
        )
        assert context is not None  # None is only a row `overflow="drop"` drops; context_only has no limit
        target = np.asarray(self._core.encode(continuation), dtype=np.int64)
        if max_length is not None and len(target) > max_length:
            raise SequenceTooLongError(f"the continuation alone is {len(target)} tokens, max_length is {max_length}")
        ids, index = context["input_ids"], context["message_index"]
        truncated = 0
        if max_length is not None and len(ids) + len(target) > max_length:
            truncated = len(ids) + len(target) - max_length
            ids, index = ids[truncated:], index[truncated:]
        return {
            "input_ids": np.concatenate([ids, target]),
            "labels": np.concatenate([np.full(len(ids), -100, dtype=np.int64), target]),
            "message_index": np.concatenate([index, np.full(len(target), len(messages), dtype=np.int32)]),
            "context_length": len(ids),
            "truncated": truncated,
        }

    def _require_native(self, messages: Conversation, chat_template: str | None, kwargs: dict[str, Any]) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k != "add_generation_prompt"}
        if self._route(messages, chat_template, kwargs) is not None:
            raise TemplateError(
                "MaskPolicy and sanitize_control_tokens need a template minijinja renders natively; this one "
                "takes the Jinja2 path (use tokenize_for_trainer's modes, or mode='generation')"
            )

    def tokenize_batch(
        self,
        conversations: Iterable[Conversation],
        mode: str = "last",
        finish_reason: str | Sequence[str | None] = "",
        num_threads: int | None = None,
        on_error: str = "raise",
        ids_dtype: str = "int32",
        policy: MaskPolicy | None = None,
        flag_reference: bool = False,
        **template_kwargs: Any,
    ) -> TokenizedBatch:
        """Label many conversations in parallel, the GIL released; see :class:`TokenizedBatch`.

        With `policy`, rows are read and labelled as :meth:`tokenize` does (`mode` and
        `finish_reason` do not apply) and the batch also carries ``message_index`` and per-row
        span statistics; rows the policy drops are listed in ``dropped``.

        `flag_reference`: also judge each row's reference mask on the spans (:mod:`chatmask.truth`),
        in the same pass; rows of a template on the Jinja2 path are not judged (``reference_unmeasured``).
        """
        if not isinstance(conversations, (list, tuple)):
            conversations = list(conversations)
        chat_template, kwargs = _split_template_kwargs(template_kwargs)
        if policy is not None:
            if flag_reference:
                raise ValueError("flag_reference judges the reference modes; it does not apply with a policy")
            return tokenize_policy_batch(
                self, conversations, policy, num_threads, on_error, ids_dtype, chat_template, kwargs
            )
        return tokenize_reference_batch(
            self,
            conversations,
            mode,
            finish_reason,
            num_threads,
            on_error,
            ids_dtype,
            chat_template,
            kwargs,
            flag_reference,
        )
