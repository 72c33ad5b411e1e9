"""The Jinja2 path: only by choice (``allow_jinja2=True``), and never without limits.

Each trigger (a construct that routes a template to Jinja2) is combined with each hostile
template; without the opt-in the template is refused with a `TemplateError` that says why and
how to opt in, with it the render ends in `TemplateLimitError` within about a second. The
stop times are printed (``-s``) and summed up at the end of the run.
"""

from __future__ import annotations

import pickle
import time
import warnings

import pytest

import chatmask
from chatmask.demo import demo_tokenizer_json

pytest.importorskip("transformers")
from transformers.utils.chat_template_utils import render_jinja_template  # noqa: E402

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

# The constructs that routed a template to Jinja2 before, each rendering some text first: `%`
# formatting, Markup's `+` and method attributes render natively now
# (tests/test_percent_format.py, tests/test_markup_and_method_attrs.py). What still reaches
# Jinja2 is syntax minijinja cannot compile (a tuple without parentheses as a for-loop's
# iterable), and only with `allow_jinja2=True`.
TRIGGERS = {
    "percent formatting": "{{ 'x%02d' % 3 }}",
    "safe plus": "{{ ('<a>' | safe) + '<b>' }}",
    "dict method as attribute": "{% if messages[0].items %}m{% endif %}",
    "Jinja2-only syntax": "{% for x in '<a>', '&lt;b&gt;' %}{{ x }}{% endfor %}",
}
NATIVE = {"percent formatting", "safe plus", "dict method as attribute"}
JINJA2_ONLY = TRIGGERS["Jinja2-only syntax"]
JINJA2 = sorted(set(TRIGGERS) - NATIVE)

HOSTILE = {
    "nested range loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "out of fuel",
    ),
    "nested loops using loop": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ loop.index if false }}{% endfor %}{% endfor %}",
        "out of fuel",
    ),
    "self-recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion limit"),
    "mutual recursion": (
        "{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n) }}{% endmacro %}{{ a(1) }}",
        "recursion limit",
    ),
    "gigabytes of output": ("{% for i in range(100000) %}{{ 'x' * 100000000 }}{% endfor %}", "output exceeds"),
    "many small outputs": ("{% for i in range(100000) %}{{ 'x' * 60000000 }}{% endfor %}", "output exceeds"),
    "doubling a string with ~": (
        "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "output exceeds",
    ),
    "doubling a string with +": (
        "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "output exceeds",
    ),
    "recursive loop": (
        "{% for i in range(100000) recursive %}{% if loop.depth < 4 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
        "out of fuel",
    ),
    "wide format": ("{{ '%*d' % (1000000000, 1) }}", "output exceeds"),
    "wide str.format": ("{{ '{:>999999999}'.format(1) }}", "output exceeds"),
    "center method": ("{{ 'x'.center(1000000000) }}", "output exceeds"),
    "center filter": ("{{ 'x' | center(1000000000) }}", "output exceeds"),
    "replace blow-up": ("{% set s = 'x' * 1000000 %}{{ s.replace('', s) }}", "output exceeds"),
    # materializing the 100,000 items takes a while: the work or wall-clock budget may end it first
    "join blow-up": ("{{ ('x' * 100000).join(range(100000) | map('string')) }}", "output exceeds|out of fuel"),
    "huge power": ("{{ 7 ** 1000000000 }}", "output exceeds"),
}

# Natively, values count against fuel, so some templates run out of fuel before the output
# limit; minijinja has no `center`, so those fail at once (a plain TemplateError).
NATIVE_OUTCOME = {
    # the string stops growing at the output limit or, one step before, when its fuel runs out
    "doubling a string with ~": (chatmask.TemplateLimitError, "output exceeds|out of fuel"),
    "doubling a string with +": (chatmask.TemplateLimitError, "output exceeds|out of fuel"),
    "center method": (chatmask.TemplateError, "has no method named center"),
    "center filter": (chatmask.TemplateError, "filter center is unknown"),
    "huge power": (chatmask.TemplateError, "unable to calculate"),
}

STOP_TIMES: dict[tuple[str, str, bool], float] = {}


def build(source: str, allow: bool, verify: int = 8) -> chatmask.ChatTokenizer:
    return chatmask.ChatTokenizer.from_parts(demo_tokenizer_json(), source, allow_jinja2=allow, verify=verify)


@pytest.mark.parametrize("trigger", JINJA2)
def test_without_the_opt_in_a_trigger_is_refused(trigger):
    source = TRIGGERS[trigger] + "{% for m in messages %}{{ m.content }}{% endfor %}"
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "rendering with Jinja2" warning: nothing renders there
        with pytest.raises(chatmask.TemplateError, match="allow_jinja2=True") as info:
            build(source, allow=False)
    assert time.perf_counter() - start < 1.0
    assert not isinstance(info.value, chatmask.TemplateLimitError)
    assert "if Jinja2 accepts this template" in str(info.value)  # minijinja's syntax error, and the way out
    # The same template given at call time, on a tokenizer whose own template is native.
    tok = build("{{ messages[0].content }}", allow=False)
    for call in (
        lambda: tok.apply_chat_template(CHAT, tokenize=False, chat_template=source),
        lambda: tok.tokenize_for_trainer(CHAT, chat_template=source),
        lambda: tok.tokenize_batch([CHAT], chat_template=source),
    ):
        with pytest.raises(chatmask.TemplateError, match="allow_jinja2=True"):
            call()
    assert tok.apply_chat_template(CHAT, tokenize=False) == "hi"


@pytest.mark.parametrize("trigger", sorted(TRIGGERS))
def test_with_the_opt_in_a_trigger_renders_like_transformers(trigger):
    source = TRIGGERS[trigger] + "{% for m in messages %}{{ m.content }}{% endfor %}"
    if trigger in NATIVE:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            tok = build(source, allow=True)
        assert tok.render_backend == "minijinja"
    else:
        with pytest.warns(UserWarning, match="allow_jinja2=True, under render limits"):
            tok = build(source, allow=True)
        assert tok.render_backend == "jinja2" and tok.allow_jinja2
    want = render_jinja_template(conversations=[CHAT], chat_template=source)[0][0]
    assert tok.apply_chat_template(CHAT, tokenize=False) == want
    assert tok.tokenize_for_trainer(CHAT)["tokens"] == tok.encode(want)


@pytest.mark.parametrize("hostile", sorted(HOSTILE))
@pytest.mark.parametrize("trigger", sorted(TRIGGERS))
@pytest.mark.parametrize("allow", [False, True], ids=["refused", "allow_jinja2"])
def test_hostile_template_with_a_trigger_stops_within_a_second(trigger, hostile, allow):
    body, reason = HOSTILE[hostile]
    source = TRIGGERS[trigger] + body
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not allow and trigger not in NATIVE:
            with pytest.raises(chatmask.TemplateError, match="allow_jinja2=True") as info:
                build(source, allow=False)
            assert not isinstance(info.value, chatmask.TemplateLimitError)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            outcome = "refused"
        else:
            tok = build(source, allow=allow)
            assert tok.render_backend == ("minijinja" if trigger in NATIVE else "jinja2")
            error, match = (chatmask.TemplateLimitError, reason)
            if trigger in NATIVE:
                error, match = NATIVE_OUTCOME.get(hostile, (error, match))
            with pytest.raises(error, match=match) as info:
                tok.apply_chat_template(CHAT, tokenize=False)
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
            outcome = f"{type(info.value).__name__} ({tok.render_backend})"
            # and the tokenizer keeps working afterwards, on a native template
            assert tok.apply_chat_template(CHAT, tokenize=False, chat_template="{{ messages[1].content }}") == "hello"
    STOP_TIMES[(trigger, hostile, allow)] = cpu
    print(
        f"\n[stop] {trigger} x {hostile}, {'allow_jinja2' if allow else 'no opt-in'}: {outcome} in {cpu:.3f} s CPU, {elapsed:.3f} s wall"
    )
    # CPU time: the wall clock on a shared machine measures the other processes too.
    assert cpu < 1.5, f"{cpu:.2f} s CPU"


def test_hostile_templates_stop_in_every_jinja2_entry_point():
    source = JINJA2_ONLY + HOSTILE["nested range loops"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = build(source, allow=True)
    for call in (
        lambda: tok.tokenize_for_trainer(CHAT),
        lambda: tok.tokenize_for_trainer(CHAT, mode="all"),
        lambda: tok.tokenize_for_trainer(CHAT, mode="generation"),
        lambda: tok.apply_chat_template(CHAT, return_assistant_tokens_mask=True),
    ):
        start = time.process_time()
        with pytest.raises(chatmask.TemplateLimitError, match="out of fuel"):
            call()
        assert time.process_time() - start < 1.5
    batch = tok.tokenize_batch([CHAT, CHAT], on_error="skip")
    assert len(batch) == 0 and [row for row, _ in batch.errors] == [0, 1]


def test_jinja2_limits_follow_render_limits():
    source = JINJA2_ONLY + "{% for i in range(3000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}ok"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = build(source, allow=True)
    with pytest.raises(chatmask.TemplateLimitError, match="out of fuel"):
        tok.apply_chat_template(CHAT, tokenize=False)
    tok.render_limits = chatmask.RenderLimits(fuel=None)
    assert tok.apply_chat_template(CHAT, tokenize=False) == "<a>&lt;b&gt;ok"
    tok.render_limits = chatmask.RenderLimits(max_output_bytes=4)
    with pytest.raises(chatmask.TemplateLimitError, match="exceeds 4 bytes"):
        tok.apply_chat_template(CHAT, tokenize=False)
    deep = JINJA2_ONLY + "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = build(deep, allow=True)
    assert tok.apply_chat_template(CHAT, tokenize=False) == "<a>&lt;b&gt;"
    tok.render_limits = chatmask.RenderLimits(max_recursion=20)
    with pytest.raises(chatmask.TemplateLimitError, match="recursion limit"):
        tok.apply_chat_template(CHAT, tokenize=False)


class _DifferentRender:
    """The core, except that its native render differs from Jinja2 (as an unknown gap would)."""

    def __init__(self, core):
        self._core = core

    def __getattr__(self, name):
        return getattr(self._core, name)

    def render(self, *args, **kwargs):
        return self._core.render(*args, **kwargs) + "!"


def test_a_verified_difference_is_refused_without_the_opt_in():
    source = "{% for m in messages %}{{ m.content }}{% endfor %}"
    tok = build(source, allow=False, verify=2)
    tok._core = _DifferentRender(tok._core)
    for _ in range(3):  # refused every time, not only on the verified call
        with pytest.raises(chatmask.TemplateError, match="differed from Jinja2.*allow_jinja2=True"):
            tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.render_backend == "minijinja"
    allowed = build(source, allow=True, verify=2)
    allowed._core = _DifferentRender(allowed._core)
    with pytest.warns(UserWarning, match="differed from Jinja2"):
        assert allowed.apply_chat_template(CHAT, tokenize=False) == "hihello"  # Jinja2's, not "hihello!"
    assert allowed.render_backend == "jinja2"


def test_a_syntax_error_is_a_syntax_error_either_way():
    source = "a\nb\n{% for %}"
    with pytest.raises(chatmask.TemplateSyntaxError, match="line 3.*allow_jinja2=True"):
        build(source, allow=False)
    with pytest.raises(chatmask.TemplateSyntaxError, match="line 3"):
        build(source, allow=True)  # Jinja2 refuses it too: minijinja's error, unchanged


def test_allow_jinja2_survives_pickling_and_the_drop_in_cache():
    source = JINJA2_ONLY + "{% for m in messages %}{{ m.content }}{% endfor %}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = build(source, allow=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copy = pickle.loads(pickle.dumps(tok))
    assert copy.allow_jinja2 and copy.render_backend == "jinja2"
    assert copy.apply_chat_template(CHAT, tokenize=False) == "<a>&lt;b&gt;hihello"
    assert copy.render_limits == tok.render_limits
    native = build("{{ messages[0].content }}", allow=False)
    assert not pickle.loads(pickle.dumps(native)).allow_jinja2

    from transformers import PreTrainedTokenizerFast

    from chatmask import dropin

    hf = PreTrainedTokenizerFast(tokenizer_object=__import__("tokenizers").Tokenizer.from_str(demo_tokenizer_json()))
    hf.chat_template = source
    with pytest.raises(chatmask.TemplateError, match="allow_jinja2=True"):
        dropin.tokenize_for_trainer(hf, CHAT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = dropin.tokenize_for_trainer(hf, CHAT, allow_jinja2=True)
    assert dropin.core_for(hf, allow_jinja2=True).render_backend == "jinja2"
    assert out["tokens"] == dropin.core_for(hf, allow_jinja2=True).encode("<a>&lt;b&gt;hihello")


def test_limited_jinja2_does_not_change_what_transformers_would_render():
    """Other callers of transformers' compiler see transformers' own template, and ours equals it."""
    from transformers.utils import chat_template_utils as ctu

    source = JINJA2_ONLY + "{% for m in messages %}{{ loop.index }}{{ m.content ~ '|' }}{% endfor %}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = build(source, allow=True)
    got = tok.apply_chat_template(CHAT, tokenize=False)
    assert type(ctu._compile_jinja_template(source).environment).__name__ == "ImmutableSandboxedEnvironment"
    assert got == render_jinja_template(conversations=[CHAT], chat_template=source)[0][0] == "<a>&lt;b&gt;1hi|2hello|"


def test_real_jinja2_path_templates_use_a_small_part_of_the_work_budget():
    """The Hub templates that needed Jinja2 until they rendered natively (the last three) render
    far inside the default limits there too: the limited Jinja2 renderer, used directly."""
    import copy

    import template_survey as survey
    from conftest import require_shared

    from chatmask import _fallback, _sandbox

    templates = require_shared("fixtures", "templates")
    survey.ROWS_PER_FILE = 3
    extra, cases = survey.build_cases()
    names = [
        "CohereForAI-c4ai-command-r-plus-tool_use",
        "SvalTek-Q3-CharThink-9B-temp",
        "meetkai-functionary-medium-v3.1",
    ]
    _sandbox.peak_units(reset=True)
    renders = limited = 0
    for name in names:
        source = (templates / f"{name}.jinja").read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = chatmask.ChatTokenizer.from_parts(demo_tokenizer_json(), source, dict(extra))
        assert tok.render_backend == "minijinja", name
        renderer = _fallback.JinjaRenderer(source, tok.special_tokens, tok._core.render_limits)
        for _, messages, tools in cases:
            for agp in (False, True):
                try:
                    renderer.render(
                        copy.deepcopy(messages),
                        add_generation_prompt=agp,
                        tools=copy.deepcopy(tools),
                        date_string="26 Jul 2024",
                    )
                except chatmask.TemplateLimitError:
                    # Only where transformers fails too (Cohere's recursive macro on two
                    # reasoning cases: a RecursionError in Jinja2 itself).
                    chat = [{k: v for k, v in m.items() if v is not None} for m in copy.deepcopy(messages)]
                    with pytest.raises(RecursionError):
                        render_jinja_template(
                            conversations=[chat],
                            tools=copy.deepcopy(tools),
                            chat_template=source,
                            add_generation_prompt=agp,
                            date_string="26 Jul 2024",
                            **extra,
                        )
                    limited += 1
                    continue
                except chatmask.ChatMaskError:
                    continue
                renders += 1
    peak, budget = _sandbox.peak_units(), chatmask.RenderLimits().fuel // _sandbox.FUEL_PER_UNIT
    print(
        f"\n[jinja2 work] {renders} renders of the 3 Jinja2-path templates, peak {peak:,} units of {budget:,}; "
        f"{limited} recursion-limit stops where transformers raises RecursionError"
    )
    assert renders > 100 and 0 < peak * 100 < budget
