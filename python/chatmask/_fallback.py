"""The Jinja2 rendering path: only by choice, and under limits.

A template minijinja cannot compile, or with a construct minijinja renders differently, or
whose native render differed from Jinja2 on a verified conversation, renders through Jinja2
only with ``allow_jinja2=True``; without it, chatmask raises a `TemplateError` that says why.
With it, the render is transformers' own `render_jinja_template` (so the bytes are
transformers'), with the compiled template swapped for one from `_sandbox.LimitedEnvironment`,
which bounds work, depth, value and output size and wall time like `RenderLimits`. Only
rendering moves to Python; tokenizing and labelling stay in Rust. It needs `transformers` (and
so `jinja2`), imported only when a template needs it.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Sequence

from . import _sandbox
from .errors import TemplateError, TemplateLimitError, TemplateSyntaxError

OPT_IN = (
    "chatmask renders with Jinja2 only by choice: pass allow_jinja2=True to "
    "ChatTokenizer.from_pretrained / from_transformers / from_parts (the render then runs in "
    "transformers' sandbox under limits equivalent to RenderLimits)"
)

_dispatch_lock = threading.Lock()
_override = threading.local()


def _prepare(chat: Sequence[Any]) -> list[Any]:
    # apply_chat_template drops None-valued keys before rendering.
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in chat]


def _transformers_render() -> Callable[..., Any]:
    """transformers' `render_jinja_template`, its template compiler made to hand back ours.

    `render_jinja_template` looks `_compile_jinja_template` up in its module on every call; the
    replacement returns the limited template only on the thread that set it, for that source,
    and otherwise calls transformers' own (cached) compiler, so other callers see no change.
    """
    from transformers.utils import chat_template_utils as ctu

    with _dispatch_lock:
        original = ctu._compile_jinja_template
        if not getattr(original, "_chatmask_dispatch", False):

            def dispatch(chat_template: str) -> Any:
                mine = getattr(_override, "template", None)
                if mine is not None and mine[0] == chat_template:
                    return mine[1]
                return original(chat_template)

            dispatch._chatmask_dispatch = True  # type: ignore[attr-defined]
            dispatch.__wrapped__ = original  # type: ignore[attr-defined]
            for name in ("cache_clear", "cache_info"):
                if hasattr(original, name):
                    setattr(dispatch, name, getattr(original, name))
            # A plain function where transformers has an lru_cache wrapper: deliberate, and the
            # wrapper's cache_clear/cache_info are carried over above for callers that use them.
            ctu._compile_jinja_template = dispatch  # type: ignore[assignment]
    return ctu.render_jinja_template


class JinjaRenderer:
    """Renders one template source as transformers 5 does, under `limits()` (core render limits)."""

    def __init__(self, source: str, special_tokens: dict[str, str], limits: Callable[[], tuple[Any, ...]]) -> None:
        self._render = _transformers_render()
        self._env = _sandbox.new_environment()
        self._template = _sandbox.compile_template(self._env, source)  # raises if Jinja2 cannot compile it
        self._limits = limits
        self._spans_lock = threading.Lock()  # transformers' AssistantTracker holds one render's state
        self.source = source
        self.special_tokens = dict(special_tokens)

    def _call(self, chat: Sequence[Any], add_generation_prompt: bool, spans: bool, kwargs: dict[str, Any]):
        kwargs = dict(kwargs)
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        previous = getattr(_override, "template", None)
        _override.template = (self.source, self._template)
        lock = self._spans_lock if spans else None
        if lock is not None:
            lock.acquire()
        try:
            with _sandbox.limited(tuple(self._limits())):
                rendered, indices = self._render(
                    conversations=[_prepare(chat)],
                    tools=tools,
                    documents=documents,
                    chat_template=self.source,
                    return_assistant_tokens_mask=spans,
                    add_generation_prompt=add_generation_prompt,
                    **{**self.special_tokens, **kwargs},
                )
        except TemplateLimitError:
            raise
        except Exception as e:  # the template's own error, e.g. raise_exception(...) or a TypeError
            raise TemplateError(str(e)) from e
        finally:
            _override.template = previous
            if lock is not None:
                lock.release()
        return rendered[0], ([tuple(s) for s in indices[0]] if spans else [])

    def render(self, chat: Sequence[Any], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        return self._call(chat, add_generation_prompt, False, kwargs)[0]

    def render_with_spans(
        self, chat: Sequence[Any], add_generation_prompt: bool = False, **kwargs: Any
    ) -> tuple[str, list[tuple[int, int]]]:
        return self._call(chat, add_generation_prompt, True, kwargs)


def why_not_native(core: Any, source: str) -> tuple[str | None, BaseException | None]:
    """Why `source` cannot render natively (None if it can), and minijinja's compile error if any.

    Every construct of the Hub collection renders natively now (`%`, Markup's `+`, method
    attributes); what remains is a template minijinja cannot compile (and `verify=`
    differences, found at render time).
    """
    error = core.compile_error(source)
    if error is not None:
        return f"minijinja cannot compile it ({error})", error
    return None, None


def open_jinja2(
    source: str,
    special_tokens: dict[str, str],
    limits: Callable[[], tuple[Any, ...]],
    reason: str,
    allow_jinja2: bool,
    compile_error: BaseException | None = None,
) -> JinjaRenderer:
    """The limited Jinja2 renderer for `source`, or the `TemplateError` that says why not."""
    if not allow_jinja2:
        if compile_error is not None:
            cls = type(compile_error) if isinstance(compile_error, TemplateError) else TemplateSyntaxError
            raise cls(f"{compile_error}; if Jinja2 accepts this template, {OPT_IN}")
        raise TemplateError(f"chatmask cannot render this chat template natively: {reason}; {OPT_IN}")
    try:
        renderer = JinjaRenderer(source, special_tokens, limits)
    except ImportError as e:
        if compile_error is not None:
            raise compile_error from None
        raise TemplateError(
            f"this chat template needs Jinja2 ({reason}) and allow_jinja2=True was given, but transformers "
            f"is not installed ({e})"
        ) from None
    except TemplateLimitError:
        raise
    except Exception:
        if compile_error is not None:
            raise compile_error from None  # Jinja2 cannot compile it either: a real syntax error
        raise
    warnings.warn(
        f"chatmask: rendering a chat template with Jinja2 (allow_jinja2=True, under render limits) because {reason}; "
        "tokenizing and labelling still run in Rust",
        stacklevel=4,
    )
    return renderer
