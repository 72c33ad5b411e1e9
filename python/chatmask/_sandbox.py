"""Jinja2 rendering under limits: transformers' environment, bounded like `RenderLimits`.

The environment is a subclass of the `ImmutableSandboxedEnvironment` transformers renders
with, carrying transformers' own extensions, filters and globals (taken from a template
transformers compiled, so the render is the same bytes). What it adds, all checked while the
template runs:

* work: every loop iteration (each for-loop's iterable is wrapped at parse time, recursive
  `loop(...)` calls too), call, attribute or item lookup, intercepted operator and `~`
  concatenation costs one unit; the budget is ``fuel // FUEL_PER_UNIT``;
* wall time: checked every 1,024 units, ``fuel / FUEL_PER_SECOND`` seconds;
* depth: nested macro calls up to ``max_recursion``; Python's own recursion limit ends deeper
  templates first, and is reported as the same limit;
* size: no single operation may build a string or list longer than ``max_output_bytes``
  (`*`, `+`, `%`, `~`, `str.join`/`replace`/`center`/`format`, the width filters, checked
  before they allocate where the size is known in advance), and the output is counted in UTF-8
  bytes as it is generated. A `MemoryError` is reported as the output limit.

A limit hit raises `TemplateLimitError`, like the native path.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from typing import Any, Iterator

from jinja2 import Template, nodes
from jinja2.runtime import LoopContext, Macro, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TemplateLimitError

# minijinja fuel is charged per instruction; one unit here (an iteration, a call, a lookup)
# is several instructions. The default fuel (10M) gives 500,000 units: plain nested loops
# spend them in ~0.25 s, loops through `loop` (LoopContext, ~2 us an iteration) hit the
# wall-clock bound first.
FUEL_PER_UNIT = 20
# The wall-clock bound: the default fuel gives 1 s, the native path's worst stop time.
FUEL_PER_SECOND = 10_000_000
_CHECK_EVERY = 1024
_DEFAULT_CAP = 64 << 20

_state = threading.local()

# Peak work units any limited render in this process used (the tests read it).
_peak = {"units": 0}


def peak_units(reset: bool = False) -> int:
    value = _peak["units"]
    if reset:
        _peak["units"] = 0
    return value


class _Budget:
    __slots__ = ("units", "max_units", "deadline", "depth", "max_depth", "cap", "next_check")

    def __init__(self, limits: tuple[int | None, int, int | None]) -> None:
        fuel, max_recursion, max_output = limits
        self.units = 0
        self.max_units = None if fuel is None else max(fuel // FUEL_PER_UNIT, 1)
        self.deadline = None if fuel is None else time.monotonic() + fuel / FUEL_PER_SECOND
        self.depth = 0
        self.max_depth = max_recursion
        self.cap = max_output
        self.next_check = _CHECK_EVERY

    def charge(self, n: int = 1) -> None:
        self.units += n
        if self.max_units is not None and self.units > self.max_units:
            raise TemplateLimitError(
                f"chat template rendered with Jinja2 exceeded a render limit: it ran out of fuel "
                f"(its work budget, {self.max_units:,} loop iterations, calls and lookups)"
            )
        if self.units >= self.next_check:
            self.next_check = self.units + _CHECK_EVERY
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise TemplateLimitError(
                    "chat template rendered with Jinja2 exceeded a render limit: it ran out of fuel "
                    "(its wall-clock budget)"
                )


def _budget() -> _Budget | None:
    return getattr(_state, "budget", None)


def _cap() -> int | None:
    budget = _budget()
    return budget.cap if budget is not None else _DEFAULT_CAP


def _too_big(size: int, what: str) -> None:
    cap = _cap()
    if cap is not None and size > cap:
        raise TemplateLimitError(
            f"chat template rendered with Jinja2 exceeded a render limit: its {what} of {size:,} "
            f"exceeds {cap:,} bytes (rendered output exceeds {cap} bytes)"
        )


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes, list, tuple, dict)):
        return len(value)
    return 0


def _int_size(value: Any) -> int:
    """Bytes of an int (a size argument), 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


_FORMAT_NUMBER = re.compile(r"\d+")


def _check_format_string(fmt: str, args: Any) -> None:
    """`%` and `str.format` widths and precisions: literal or `*` (then from the arguments)."""
    for number in _FORMAT_NUMBER.findall(fmt):
        if len(number) > 6:
            _too_big(int(number), "format width")
    if "*" in fmt:
        values = args if isinstance(args, (tuple, list)) else (args,)
        for v in values:
            _too_big(_int_size(v), "format width")


def _join_size(sep: Any, items: Any) -> int:
    if not isinstance(items, (list, tuple, str, dict)):
        return 0
    total = len(sep) * max(len(items) - 1, 0) if isinstance(sep, str) else 0
    for item in items if not isinstance(items, dict) else items.keys():
        total += len(item) if isinstance(item, str) else 24
    return total


def _replace_size(s: Any, old: Any, new: Any) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    hits = s.count(old) if old else len(s) + 1
    return len(s) + hits * (len(new) - len(old))


def _is_str_method(obj: Any, name: str) -> bool:
    target = getattr(obj, "__wrapped__", obj)
    return isinstance(getattr(target, "__self__", None), str) and getattr(target, "__name__", "") == name


def _precheck_method(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Sizes a str method will allocate, before it runs (the sandbox wraps `str.format`)."""
    target = getattr(obj, "__wrapped__", obj)
    owner = getattr(target, "__self__", None)
    if not isinstance(owner, str):
        return
    name = getattr(target, "__name__", "")
    if name == "join" and args:
        _too_big(_join_size(owner, args[0]), "joined string")
    elif name == "replace" and len(args) >= 2:
        _too_big(_replace_size(owner, args[0], args[1]), "replaced string")
    elif name in ("center", "ljust", "rjust", "zfill") and args:
        _too_big(_int_size(args[0]), "padded string")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        _too_big(owner.count("\t") * _int_size(tab), "expanded string")
    elif name in ("format", "format_map"):
        _check_format_string(owner, args)


def _checked_filter(name: str, func: Any) -> Any:
    """A filter with its size arguments checked before and its result after it runs."""

    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # a context/environment first

    def precheck(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        values = args[skip:]
        head, rest = (values[0], values[1:]) if values else (None, ())
        if name == "center":
            width = rest[0] if rest else kwargs.get("width", 80)
            _too_big(_int_size(width), "|center result")
        elif name == "indent":
            width = rest[0] if rest else kwargs.get("width", 4)
            per_line = len(width) if isinstance(width, str) else _int_size(width)
            lines = head.count("\n") + 1 if isinstance(head, str) else 1
            _too_big(per_line * lines + _size(head), "|indent result")
        elif name == "join":
            sep = rest[0] if rest else kwargs.get("d", "")
            _too_big(_join_size(sep, head), "joined string")
        elif name == "replace" and len(rest) >= 2:
            _too_big(_replace_size(head, rest[0], rest[1]), "replaced string")
        elif name == "format" and isinstance(head, str):
            _check_format_string(head, rest)
        elif name == "tojson":
            indent = rest[1] if len(rest) > 1 else kwargs.get("indent")
            if (len(indent) if isinstance(indent, str) else _int_size(indent)) > 4096:
                raise TemplateLimitError(
                    "chat template rendered with Jinja2 exceeded a render limit: a |tojson indent over 4096 "
                    "(rendered output exceeds the output limit)"
                )

    def checked(*args: Any, **kwargs: Any) -> Any:
        if name == "join" and len(args) > skip and not isinstance(args[skip], (list, tuple, str, dict)):
            args = (*args[:skip], list(args[skip]), *args[skip + 1 :])  # sized, so it can be checked first
        precheck(args, kwargs)
        out = func(*args, **kwargs)
        _too_big(_size(out), f"|{name} result")
        return out

    checked.__dict__.update(getattr(func, "__dict__", {}))  # keeps jinja_pass_arg
    checked.__name__ = getattr(func, "__name__", name)
    checked.__doc__ = getattr(func, "__doc__", None)
    return checked


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox with work, depth, size and time bounds (see the module doc)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):
            call = nodes.Call(nodes.EnvironmentAttribute("chatmask_loop"), [loop.iter], [], None, None)
            call.set_lineno(loop.iter.lineno or loop.lineno or 1)
            call.set_environment(self)
            loop.iter = call
        return tree

    def chatmask_loop(self, iterable: Any) -> Any:
        """Each for-loop's iterable: the same items, one work unit each."""
        it = iter(iterable)  # raises here, as the loop itself would ("not iterable")
        budget = _budget()
        if budget is None:
            return it
        return _counted(it, budget)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget()
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        budget.charge()
        if isinstance(__obj, LoopContext) and args:
            args = (_counted(iter(args[0]), budget), *args[1:])
        if _is_str_method(__obj, "join") and args and not isinstance(args[0], (list, tuple, str, dict)):
            args = (list(_counted(iter(args[0]), budget)), *args[1:])  # sized, so it can be checked first
        _precheck_method(__obj, args, kwargs)
        if isinstance(__obj, Macro):
            budget.depth += 1
            if budget.depth > budget.max_depth:
                budget.depth -= 1
                raise TemplateLimitError(
                    "chat template rendered with Jinja2 exceeded a render limit: it exceeded the recursion limit"
                )
            try:
                out = super().call(__context, __obj, *args, **kwargs)
            finally:
                budget.depth -= 1
        else:
            out = super().call(__context, __obj, *args, **kwargs)
        _too_big(_size(out), "call result")
        return out

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        if budget is not None:
            budget.charge()
        if operator == "*":
            seq, times = (left, right) if _size(left) else (right, left)
            if _size(seq) and isinstance(times, int):
                _too_big(_size(seq) * max(times, 0), "repeated value")
            elif isinstance(left, int) and isinstance(right, int):
                _too_big((abs(left).bit_length() + abs(right).bit_length()) // 8, "integer")
        elif operator == "+":
            if _size(left) and _size(right):
                _too_big(_size(left) + _size(right), "concatenated value")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                _too_big(abs(left).bit_length() * right // 8, "integer")
        elif operator == "%" and isinstance(left, str):
            _check_format_string(left, right)
        return super().call_binop(context, operator, left, right)

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _budget()
        if budget is not None:
            budget.charge()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _budget()
        if budget is not None:
            budget.charge()
        return super().getitem(obj, argument)


def _counted(it: Any, budget: _Budget) -> Any:
    for item in it:
        budget.charge()
        yield item


def _checked_join(join: Any) -> Any:
    def checked(seq: Any) -> Any:
        parts = list(seq)
        budget = _budget()
        if budget is not None:
            budget.charge()
        _too_big(sum(len(p) if isinstance(p, str) else 0 for p in parts), "concatenated string")
        out = join(parts)
        _too_big(len(out), "concatenated string")
        return out

    return checked


_SOURCE_ENV: dict[str, Any] = {}


def _transformers_environment() -> Any:
    """The environment transformers compiles chat templates in (from a harmless template)."""
    env = _SOURCE_ENV.get("env")
    if env is None:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        env = _compile_jinja_template("{{ '' }}").environment
        _SOURCE_ENV["env"] = env
    return env


def new_environment() -> LimitedEnvironment:
    """A `LimitedEnvironment` configured exactly as transformers configures its sandbox."""
    source = _transformers_environment()
    env = LimitedEnvironment(
        trim_blocks=source.trim_blocks,
        lstrip_blocks=source.lstrip_blocks,
        keep_trailing_newline=source.keep_trailing_newline,
        autoescape=source.autoescape,
        extensions=[type(ext) for ext in source.extensions.values()],
    )
    env.template_class = LimitedTemplate
    env.policies.update(source.policies)
    env.filters.update({k: v for k, v in source.filters.items() if env.filters.get(k) is not v})
    env.filters = {name: _checked_filter(name, f) for name, f in env.filters.items()}
    env.tests.update(source.tests)
    env.globals.update({k: v for k, v in source.globals.items() if k not in env.globals or env.globals[k] is not v})
    return env


class LimitedTemplate(Template):
    """Counts the output in UTF-8 bytes as it is generated (`render` joins `generate`)."""

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        budget = _budget()
        cap = budget.cap if budget is not None else None
        size = 0
        for chunk in super().generate(*args, **kwargs):
            if cap is not None:
                size += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8", "surrogatepass"))
                if size > cap:
                    raise TemplateLimitError(
                        "chat template rendered with Jinja2 exceeded a render limit: its rendered output "
                        f"exceeds {cap} bytes"
                    )
            yield chunk

    def render(self, *args: Any, **kwargs: Any) -> str:
        return "".join(self.generate(*args, **kwargs))


def compile_template(env: LimitedEnvironment, source: str) -> Any:
    """The compiled template, its `~` concatenations size-checked."""
    template = env.from_string(source)
    namespace = template.root_render_func.__globals__
    namespace["str_join"] = _checked_join(str_join)
    namespace["markup_join"] = _checked_join(markup_join)
    return template


@contextlib.contextmanager
def limited(limits: tuple[int | None, int, int | None]) -> Iterator[_Budget]:
    """Renders on this thread inside the block run under `limits` (fuel, recursion, output)."""
    budget = _Budget(limits)
    previous = _budget()
    _state.budget = budget
    try:
        yield budget
    except RecursionError:
        raise TemplateLimitError(
            "chat template rendered with Jinja2 exceeded a render limit: it exceeded the recursion limit"
        ) from None
    except MemoryError:
        raise TemplateLimitError(
            "chat template rendered with Jinja2 exceeded a render limit: a value it built ran out of memory "
            f"(rendered output exceeds {budget.cap} bytes)"
        ) from None
    finally:
        _state.budget = previous
        _peak["units"] = max(_peak["units"], budget.units)
