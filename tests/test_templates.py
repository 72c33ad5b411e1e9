"""Render parity on the Hub template collection: every case identical to transformers or both raise.

Cases per template: the three built-in conversations of ../shared/fixtures/templates/render_check.py
and every prefix of them, plus the first rows of every conversation file (with their tools), each
with add_generation_prompt False and True. Rendering goes through the public path, so a template
chatmask routes to Jinja2 (cannot compile, a known-different construct, or a difference found by
verification) is rendered exactly (built with ``allow_jinja2=True``; without it, exactly those
templates are refused). The test reports how many templates stay native.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
from conftest import require_shared

import chatmask

ROWS_PER_FILE = int(os.environ.get("CHATMASK_TEMPLATE_ROWS", "3"))
DATE = "26 Jul 2024"


def test_every_template_renders_like_transformers():
    import template_survey as survey
    from transformers.utils.chat_template_utils import render_jinja_template

    templates_dir = require_shared("fixtures", "templates")
    survey.ROWS_PER_FILE = ROWS_PER_FILE
    extra_vars, cases = survey.build_cases()
    demo_json = chatmask.demo.demo_tokenizer_json()
    compared = raised_alike = 0
    differing, fallback, refused = [], {}, set()
    paths = sorted(templates_dir.glob("*.jinja"))
    for path in paths:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = chatmask.ChatTokenizer.from_parts(demo_json, source, dict(extra_vars), allow_jinja2=True)
            for case_id, messages, tools in cases:
                for agp in (False, True):
                    chat = [{k: v for k, v in m.items() if v is not None} for m in copy.deepcopy(messages)]
                    try:
                        want = render_jinja_template(
                            conversations=[chat],
                            tools=copy.deepcopy(tools),
                            chat_template=source,
                            add_generation_prompt=agp,
                            date_string=DATE,
                            **extra_vars,
                        )[0][0]
                    except Exception:
                        want = None
                    try:
                        got = tok.apply_chat_template(
                            copy.deepcopy(messages),
                            tools=copy.deepcopy(tools),
                            add_generation_prompt=agp,
                            tokenize=False,
                            date_string=DATE,
                        )
                    except chatmask.ChatMaskError:
                        got = None
                    compared += 1
                    if want is None and got is None:
                        raised_alike += 1
                    elif want != got:
                        differing.append(f"{path.stem} {case_id} agp={agp}")
        if tok.render_backend == "jinja2":
            fallback[path.stem] = next((str(w.message) for w in caught if "Jinja2" in str(w.message)), "")
        try:  # without the opt-in, exactly the templates on the Jinja2 path are refused
            chatmask.ChatTokenizer.from_parts(demo_json, source, dict(extra_vars))
        except chatmask.TemplateError as e:
            assert "allow_jinja2=True" in str(e), str(e)
            refused.add(path.stem)
    native = len(paths) - len(fallback)
    print(
        f"\n{len(paths)} templates, {compared} cases: {compared - len(differing)} identical or raised alike "
        f"({raised_alike} raised alike), {len(differing)} differ; {native} native ({native / len(paths):.1%}), "
        f"{len(fallback)} on the Jinja2 path:"
    )
    for name, reason in sorted(fallback.items()):
        print(f"  {name}: {reason}")
    assert not differing, "\n".join(differing[:30])
    assert refused == set(fallback), sorted(refused ^ set(fallback))
    assert native == len(paths), sorted(fallback)


CHAT = [{"role": "user", "content": "a < b"}, {"role": "assistant", "content": "ok"}]


@pytest.mark.parametrize(
    "source, want",
    [
        ("{% for m in messages %}{{ (m.content | safe) + '&' }}{% endfor %}", "a < b&amp;ok&amp;"),
        ("{% macro f(x) %}{{ x is mapping }}{% endmacro %}{{ f(messages[0].items) }}", "False"),
    ],
)
def test_former_jinja2_constructs_render_natively(source, want):
    # These took the Jinja2 path until Markup's `+` and method attributes rendered natively.
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "rendering with Jinja2" warning
        tok = chatmask.ChatTokenizer.from_parts(chatmask.demo.demo_tokenizer_json(), source)
    assert tok.render_backend == "minijinja"
    assert (
        tok.apply_chat_template(CHAT, tokenize=False)
        == render_jinja_template(conversations=[CHAT], chat_template=source)[0][0]
        == want
    )
    assert tok.tokenize_for_trainer(CHAT)["tokens"] == tok.encode(want)


class _DifferentRender:
    """The core, except that its native render differs from Jinja2 (as an unknown gap would)."""

    def __init__(self, core):
        self._core = core

    def __getattr__(self, name):
        return getattr(self._core, name)

    def render(self, *args, **kwargs):
        return self._core.render(*args, **kwargs) + "!"


@pytest.mark.parametrize("verify", [0, 2])
def test_verification_switches_to_jinja2_on_a_difference(verify):
    pytest.importorskip("transformers")
    source = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tok = chatmask.ChatTokenizer.from_parts(
        chatmask.demo.demo_tokenizer_json(), source, verify=verify, allow_jinja2=True
    )
    tok._core = _DifferentRender(tok._core)
    assert tok.render_backend == "minijinja"
    if verify == 0:
        assert tok.apply_chat_template(CHAT, tokenize=False) == "a < bok!"  # not verified: native render
        return
    with pytest.warns(UserWarning, match="differed from Jinja2"):
        assert tok.apply_chat_template(CHAT, tokenize=False) == "a < bok"
    assert tok.render_backend == "jinja2"


# One snippet per known minijinja/Jinja2 gap; each must render natively and equal Jinja2 exactly.
GAPS = {
    "tojson": "{{ {'b': 1.0, 'a': [1e20, 0.1, none, true], 'é': '<&>'} | tojson }}|{{ {'b': 1, 'a': 2} | tojson(indent=2, sort_keys=true) }}|{{ [1, 2] | tojson(separators=(',', ':')) }}",
    "str_methods": "{% set s = ' a.b.c ' %}{{ s.rsplit('.', 1) }}{{ s.partition('.')[2] }}{{ s.rpartition('.')[0] }}{{ s.removeprefix(' a') }}{{ s.removesuffix('c ') }}{{ s.index('b') }}{{ '7'.zfill(3) }}{{ 'hello world'.title() }}{{ 'hELLO'.capitalize() }}{{ s.count('.') }}{{ s.find('z') }}",
    "strip_whitespace_set": "[{{ '\u00a0\u2028 x \x1c\x1f'.strip() }}][{{ ' a\u3000b '.split() }}]",
    "numbers": "{{ 1.0 }} {{ 1e16 }} {{ 0.1 + 0.2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 / 2 }} {{ 2 ** 10 }} {{ 10 / 5 }}",
    "crlf_source": "{% for m in messages %}\r\n{{ m.content }}\r\n{% endfor %}\r\n",
    "negative_slices": "{{ messages[::-1] | map(attribute='role') | list }}{{ 'abcdef'[::-2] }}{{ [1, 2, 3, 4][-1:0:-1] }}",
    "namespace": "{% set ns = namespace(n=0, last='') %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% set ns.last = m.role %}{% endfor %}{{ ns.n }}{{ ns.last }}",
    "loop_items": "{% for m in messages %}{{ loop.previtem.role if loop.previtem is defined else '-' }}>{{ loop.nextitem.role if loop.nextitem is defined else '-' }};{% endfor %}",
    "selectattr": "{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | list }}{{ messages | rejectattr('role', 'equalto', 'user') | list | length }}",
    "defined_keys": "{% for m in messages %}{{ m.name is defined }}{{ m['role'] is defined }}{{ m.missing is undefined }}{% endfor %}",
    "dict_items": "{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}{{ messages[0].keys() | list }}{{ messages[0].get('nope', 'd') }}",
    "iterate_none": "{% for t in tools %}{{ t }}{% endfor %}",
    "python_reprs": "{{ messages[0] }}{{ none }}{{ true }}{{ {'k': [none, false]} }}",
    "percent_formatting": "{% for m in messages %}{{ '%s: %-4s|%05.1f;' % (m.role, m.content, 2.25) }}{{ '<image_%02d>' % loop.index }}{% endfor %}{{ '%(role)s' % messages[0] }}",
    "tuples_printed": "{{ 'a,b'.partition(',') }}{{ (1,) }}{{ () }}{{ (1, 'x') }}{% for kv in messages[0].items() %}{{ kv }}{% endfor %}",
    "title_filter_separators": "{{ 'a\x1cb c-d(e' | title }}|{{ 'hello wORLD' | wordcount }}|{{ 'ǅa ΑΣ'.swapcase() }}|{{ 'ǅa'.islower() }}|{{ '\u0345'.isalpha() }}",
}


@pytest.mark.parametrize("name", sorted(GAPS))
def test_known_gap_renders_like_jinja2(name):
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    source = GAPS[name]
    chat = [{"role": "user", "content": "hi", "name": "n"}, {"role": "assistant", "content": "yo"}]
    tok = chatmask.ChatTokenizer.from_parts(chatmask.demo.demo_tokenizer_json(), source, verify=0)
    assert tok.render_backend == "minijinja"
    try:
        want = render_jinja_template(conversations=[copy.deepcopy(chat)], chat_template=source)[0][0]
    except TypeError as e:  # iterating None: both must raise, with Jinja2's message
        with pytest.raises(chatmask.TemplateError, match=str(e)):
            tok.apply_chat_template(chat, tokenize=False)
        return
    assert tok.apply_chat_template(chat, tokenize=False) == want
