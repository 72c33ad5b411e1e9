"""Python's str case methods and predicates on every code point, against the running Python.

Jinja2 calls Python's `str` methods, which follow this Python's `unicodedata`; chatmask takes
its case mappings from the same Python (chatmask/_unicode.py) and treats the code points this
Python lacks as unassigned. Every code point chatmask's tables or Python's know is compared
one by one (the count is printed with ``-s``); context rules (final sigma, word starts) get
random strings from the characters they involve.
"""

from __future__ import annotations

import unicodedata

import pytest

import chatmask
from chatmask import _core
from chatmask.demo import demo_tokenizer_json

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SEP = "\0"  # no mapping yields NUL from another character, so outputs split cleanly
METHODS = [
    "upper()",
    "lower()",
    "title()",
    "capitalize()",
    "swapcase()",
    "casefold()",
    "isalpha()",
    "islower()",
    "isupper()",
]
TOK = chatmask.ChatTokenizer.from_parts(demo_tokenizer_json(), "{{ messages[0].content }}", verify=0)
TOK.render_limits = chatmask.RenderLimits(fuel=None, max_output_bytes=None)
CHAT = [{"role": "user", "content": "x"}]


def render(source: str, **kwargs) -> str:
    return TOK.apply_chat_template(CHAT, tokenize=False, chat_template=source, **kwargs)


def code_points() -> list[str]:
    """ASCII but NUL, everything Rust's tables know, everything this Python knows."""
    known = set(_core.unicode_known_text())
    for c in range(0x80, 0x110000):
        if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) not in ("Cn", "Co"):
            known.add(chr(c))
    return [chr(c) for c in range(1, 0x80)] + sorted(known - {chr(c) for c in range(0x80)})


def test_every_code_point_maps_like_python():
    chars = code_points()
    compared = 0
    for method in METHODS:
        for start in range(0, len(chars), 40_000):
            chunk = chars[start : start + 40_000]
            got = render("{% for c in cs %}{{ c." + method + " }}" + SEP + "{% endfor %}", cs=chunk).split(SEP)[:-1]
            want = [str(getattr(c, method[:-2])()) for c in chunk]
            assert len(got) == len(want)
            bad = [(c, g, w) for c, g, w in zip(chunk, got, want) if g != w]
            assert not bad, f"{method}: {len(bad)} differ, first {bad[:5]!r}"
            compared += len(chunk)
    # repr() of each code point, as printed inside a list
    for start in range(0, len(chars), 40_000):
        chunk = chars[start : start + 40_000]
        got = render("{{ cs }}", cs=chunk)
        assert got == repr(chunk)
        compared += len(chunk)
    print(f"\n[unicode] {compared} code-point results compared with Python {unicodedata.unidata_version}")
    assert compared >= 10 * 100_000


# Characters the context rules involve: sigmas, cased letters, case-ignorable ones, uncased ones.
CONTEXT = st.text(alphabet="ΣσςAaǅǆßﬀ'.:\u0308\u00b7\u02b0 -ƻ1\u0345İ", max_size=8)


CONTEXT_TEMPLATE = (
    "{{ s.lower() }}|{{ s.upper() }}|{{ s.title() }}|{{ s.capitalize() }}|{{ s.swapcase() }}|{{ s.casefold() }}"
    "|{{ s|title }}|{{ s|capitalize }}|{{ s|lower }}|{{ s|upper }}"
)


def test_context_rules_match_jinja2():
    jinja2 = pytest.importorskip("jinja2")
    oracle = jinja2.Environment().from_string(CONTEXT_TEMPLATE)
    compared = []

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(CONTEXT)
    def check(s):
        assert render(CONTEXT_TEMPLATE, s=s) == oracle.render(s=s), repr(s)
        compared.append(s)

    check()
    print(f"\n[unicode] {len(compared)} strings through 10 case operations, compared with Jinja2")
    assert len(compared) >= 400
