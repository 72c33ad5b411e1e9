"""`RenderLimits`: bounds on one native template render (templates are untrusted code)."""

from __future__ import annotations

from dataclasses import dataclass

from . import _core

_FUEL, _RECURSION, _OUTPUT = _core.DEFAULT_RENDER_LIMITS


@dataclass(frozen=True)
class RenderLimits:
    """Limits every native (minijinja) render of a :class:`ChatTokenizer` runs under.

    A render that exceeds one raises :class:`chatmask.TemplateLimitError`, naming the limit.

    * ``fuel``: minijinja's instruction budget per render, which also charges for the values
      the template builds (about 64 bytes per unit). The default is far above what real
      templates use on long conversations and stops a runaway loop within about a second.
    * ``max_recursion``: nesting depth of loops, ifs and macro calls (a macro call costs
      several levels); minijinja grows the stack as needed, so raising it is safe.
    * ``max_output_bytes``: the rendered text, in UTF-8 bytes.

    ``None`` removes a limit. The Jinja2 path (``allow_jinja2=True``, for templates minijinja
    cannot render exactly) runs under the same limits, counted its own way: ``fuel // 20``
    work units (loop iterations, calls, lookups), ``fuel / 10M`` seconds of wall time, macro
    depth ``max_recursion``, and no value or output over ``max_output_bytes``.
    """

    fuel: int | None = _FUEL
    max_recursion: int = _RECURSION
    max_output_bytes: int | None = _OUTPUT

    def __post_init__(self) -> None:
        for name in ("fuel", "max_output_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"RenderLimits.{name} must be a non-negative int or None, not {value!r}")
        if not isinstance(self.max_recursion, int) or self.max_recursion < 1:
            raise ValueError(f"RenderLimits.max_recursion must be a positive int, not {self.max_recursion!r}")


__all__ = ["RenderLimits"]
