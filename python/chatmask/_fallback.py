"""The exact rendering path: transformers' own Jinja2 environment.

Used for a template minijinja cannot compile, or one whose minijinja render differed from
Jinja2 on a verified conversation. Only rendering moves to Python; tokenizing and labelling
stay in Rust. It needs `transformers` (and so `jinja2`), imported only when a template needs it.
"""

from __future__ import annotations

from typing import Any, Sequence

from .errors import TemplateError


def _prepare(chat: Sequence[Any]) -> list[Any]:
    # apply_chat_template drops None-valued keys before rendering.
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in chat]


class JinjaRenderer:
    """Renders one template source exactly as transformers 5 does."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        from transformers.utils.chat_template_utils import _compile_jinja_template, render_jinja_template

        _compile_jinja_template(source)  # raises if Jinja2 cannot compile it either
        self._render = render_jinja_template
        self.source = source
        self.special_tokens = dict(special_tokens)

    def _call(self, chat: Sequence[Any], add_generation_prompt: bool, spans: bool, kwargs: dict[str, Any]):
        kwargs = dict(kwargs)
        tools, documents = kwargs.pop("tools", None), kwargs.pop("documents", None)
        try:
            rendered, indices = self._render(
                conversations=[_prepare(chat)],
                tools=tools,
                documents=documents,
                chat_template=self.source,
                return_assistant_tokens_mask=spans,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},
            )
        except Exception as e:  # the template's own error, e.g. raise_exception(...) or a TypeError
            raise TemplateError(str(e)) from e
        return rendered[0], ([tuple(s) for s in indices[0]] if spans else [])

    def render(self, chat: Sequence[Any], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        return self._call(chat, add_generation_prompt, False, kwargs)[0]

    def render_with_spans(
        self, chat: Sequence[Any], add_generation_prompt: bool = False, **kwargs: Any
    ) -> tuple[str, list[tuple[int, int]]]:
        return self._call(chat, add_generation_prompt, True, kwargs)
