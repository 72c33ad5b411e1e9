"""Python's `%` rendered natively: random format specs and values against Python's own `%`.

Jinja2 evaluates `a % b` with Python's operator, so Python is the oracle: an example either
renders to exactly Python's text or raises in both. The examples compared are counted and
printed (``-s``); the CI profile runs a few hundred, ``-m slow`` many more.
"""

from __future__ import annotations

import math

import pytest

import chatmask
from chatmask.demo import demo_tokenizer_json

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOK = chatmask.ChatTokenizer.from_parts(demo_tokenizer_json(), "{{ messages[0].content }}", verify=0)
CHAT = [{"role": "user", "content": "x"}]
COUNTS = {"examples": 0, "rendered": 0, "raised": 0}

FLAGS = st.text(alphabet="#0- +", max_size=3)
WIDTH = st.sampled_from(["", "*", "1", "5", "12", "0"]) | st.integers(0, 30).map(str)
PRECISION = st.sampled_from(["", ".", ".*", ".0", ".1", ".3", ".10"]) | st.integers(0, 25).map(lambda n: f".{n}")
CONVERSION = st.sampled_from(list("sradiuoxXeEfFgGc%")) | st.sampled_from(["z", "q", "ld", "hd"])
SPEC = st.builds(lambda f, w, p, c: f"%{f}{w}{p}{c}", FLAGS, WIDTH, PRECISION, CONVERSION)
LITERAL = st.text(alphabet="ab -:|é", max_size=4)
FORMAT = st.lists(st.tuples(LITERAL, SPEC), min_size=1, max_size=4).map(lambda parts: "".join(a + b for a, b in parts))
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.5, 1.5, 2.5, -0.0, 1e16, 1e-5, 123456789.0]
)
VALUE = (
    st.integers(-(10**6), 10**6)
    | st.integers(-(2**62), 2**62)
    | FLOATS
    | st.text(alphabet="xyz<é'\"", max_size=5)
    | st.booleans()
    | st.none()
    | st.integers(0, 0x2FFFF)
)


def render(source: str, **kwargs) -> str | None:
    try:
        return TOK.apply_chat_template(CHAT, tokenize=False, chat_template=source, **kwargs)
    except chatmask.TemplateError:
        return None


def python(fmt: str, args) -> str | None:
    try:
        out = fmt % args
    except Exception:
        return None
    return out


def check(want: str | None, got: str | None, what: str) -> None:
    COUNTS["examples"] += 1
    if want is not None and any(0xD800 <= ord(c) <= 0xDFFF for c in want):
        assert got is None, what  # a lone surrogate from %c: chatmask raises, never renders another text
        COUNTS["raised"] += 1
        return
    assert got == want, what
    COUNTS["rendered" if want is not None else "raised"] += 1


SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@SETTINGS
@given(FORMAT, st.lists(VALUE, max_size=5))
def test_tuple_formatting_matches_python(fmt, values):
    names = [f"a{i}" for i in range(len(values))]
    tuple_src = "(" + "".join(f"{n}, " for n in names) + ")" if values else "()"
    source = "{{ " + repr(fmt) + " % " + tuple_src + " }}"
    check(python(fmt, tuple(values)), render(source, **dict(zip(names, values))), f"{fmt!r} % {tuple(values)!r}")


@SETTINGS
@given(FORMAT, VALUE)
def test_single_value_formatting_matches_python(fmt, value):
    source = "{{ " + repr(fmt) + " % v }}"
    check(python(fmt, value), render(source, v=value), f"{fmt!r} % {value!r}")
    # the format string in a variable formats the same way
    check(python(fmt, value), render("{{ f % v }}", f=fmt, v=value), f"f % {value!r}")


@SETTINGS
@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), SPEC), min_size=1, max_size=3),
    st.dictionaries(st.sampled_from(["a", "b"]), VALUE),
)
def test_mapping_formatting_matches_python(parts, mapping):
    fmt = "".join(f"%({key}){spec[1:]}" for key, spec in parts)
    check(python(fmt, mapping), render("{{ " + repr(fmt) + " % d }}", d=mapping), f"{fmt!r} % {mapping!r}")


@SETTINGS
@given(st.integers(-(10**9), 10**9) | FLOATS | st.booleans(), st.integers(-50, 50) | FLOATS | st.booleans())
def test_numeric_modulo_matches_python(a, b):
    want = python_mod(a, b)
    got = render("{{ a % b }}", a=a, b=b)
    check(want, got, f"{a!r} % {b!r}")


def python_mod(a, b) -> str | None:
    try:
        r = a % b
    except Exception:
        return None
    if isinstance(r, float) and math.isnan(r):
        return "nan"
    return str(r)


def test_examples_from_the_hub_and_tuples():
    assert (
        render("{% for i in range(3) %}{{ '<image_%02d>' % (i + 1) }}{% endfor %}") == "<image_01><image_02><image_03>"
    )
    assert render("{{ 'video_%02d' % n }}", n=7) == "video_07"
    assert render("{{ '%s=%s' % ('a', 1) }}|{{ '%s' % [1, 2] }}|{{ '%s' % ((1, 2),) }}") == "a=1|[1, 2]|(1, 2)"
    assert render("{% for k, v in d.items() %}{{ '%s:%s;' % (k, v) }}{% endfor %}", d={"x": 1}) == "x:1;"
    assert render("{% set p = 'a,b'.partition(',') %}{{ '%s|%s|%s' % p }}{{ p }}") == "a|,|b('a', ',', 'b')"
    assert render("{{ ((7 % 3) ~ '|' ~ (-7 % 3) ~ '|' ~ (7.5 % -2)) }}") == "1|2|-0.5"
    # a sequence whose Python type chatmask cannot know (a list variable) is refused, not guessed
    assert render("{{ '%s' % xs }}", xs=[1, 2]) is None
    assert render("{{ ('%s' | safe) % '<' }}") is None  # Markup formatting: not rendered natively
    print(
        f"\n[percent] {COUNTS['examples']} examples compared with Python's %: {COUNTS['rendered']} rendered alike, {COUNTS['raised']} raised alike"
    )
