"""Chat templates are untrusted code: runaway templates stop at a limit, panics never crash.

Every failure here must be an ordinary ``chatmask.ChatMaskError`` (never pyo3's
``PanicException``, a ``BaseException``), and the tokenizer must keep working afterwards.
"""

from __future__ import annotations

import threading

import pytest

import chatmask
from chatmask.demo import demo_conversations, demo_tokenizer_json

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]

RUNAWAY = {
    "nested range loops": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "out of fuel",
    ),
    "self-recursive macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion limit"),
    "gigabytes of output": ("{% for i in range(100000) %}{{ 'x' * 100000000 }}{% endfor %}", "output exceeds"),
    "doubling a string": (
        "{% set ns = namespace(s='x') %}{% for i in range(100) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "out of fuel",
    ),
    "mutual recursion through a namespace": (
        "{% macro a(n) %}{{ b(n) }}{% endmacro %}{% macro b(n) %}{{ a(n) }}{% endmacro %}{{ a(1) }}",
        "recursion limit",
    ),
}


def from_template(source: str) -> chatmask.ChatTokenizer:
    return chatmask.ChatTokenizer.from_parts(demo_tokenizer_json(), source)


@pytest.mark.parametrize("name", sorted(RUNAWAY))
def test_runaway_template_raises_a_limit_error(name):
    source, reason = RUNAWAY[name]
    tok = from_template(source)
    with pytest.raises(chatmask.TemplateLimitError, match=reason) as info:
        tok.tokenize_for_trainer(CHAT)
    assert isinstance(info.value, chatmask.TemplateError) and isinstance(info.value, ValueError)
    batch = tok.tokenize_batch([CHAT, CHAT], on_error="skip", num_threads=2)
    assert len(batch) == 0 and [row for row, _ in batch.errors] == [0, 1]
    assert all(reason in message for _, message in batch.errors)


@pytest.mark.parametrize("name", ["nested range loops", "gigabytes of output"])
def test_runaway_template_is_not_verified_with_jinja2(name):
    # With transformers imported, new templates are verified against Jinja2, which has no
    # limits: a template that hit one must not be rendered there (it would hang, or take
    # gigabytes).
    pytest.importorskip("transformers")
    source, reason = RUNAWAY[name]
    tok = chatmask.ChatTokenizer.from_parts(demo_tokenizer_json(), source, verify=8)
    with pytest.raises(chatmask.TemplateLimitError, match=reason):
        tok.tokenize_for_trainer(CHAT)
    assert tok.render_backend == "minijinja"


def test_limits_are_configurable():
    tok = from_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    default = tok.render_limits
    assert default == chatmask.RenderLimits()
    assert default.fuel and default.max_output_bytes and default.max_recursion >= 100
    assert tok.apply_chat_template(CHAT, tokenize=False) == "hihello"

    tok.render_limits = chatmask.RenderLimits(max_output_bytes=4)
    with pytest.raises(chatmask.TemplateLimitError, match="exceeds 4 bytes"):
        tok.apply_chat_template(CHAT, tokenize=False)
    tok.render_limits = chatmask.RenderLimits(fuel=5)
    with pytest.raises(chatmask.TemplateLimitError, match="fuel"):
        tok.tokenize_for_trainer(CHAT)
    tok.render_limits = default
    assert tok.apply_chat_template(CHAT, tokenize=False) == "hihello"

    deep = from_template("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}ok")
    assert deep.apply_chat_template(CHAT, tokenize=False) == "ok"
    deep.render_limits = chatmask.RenderLimits(max_recursion=20)
    with pytest.raises(chatmask.TemplateLimitError, match="recursion"):
        deep.apply_chat_template(CHAT, tokenize=False)

    loops = from_template("{% for i in range(2000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}ok")
    with pytest.raises(chatmask.TemplateLimitError):
        loops.apply_chat_template(CHAT, tokenize=False)
    loops.render_limits = chatmask.RenderLimits(fuel=None)
    assert loops.apply_chat_template(CHAT, tokenize=False) == "ok"

    with pytest.raises(ValueError, match="fuel"):
        chatmask.RenderLimits(fuel=-1)
    with pytest.raises(TypeError, match="RenderLimits"):
        tok.render_limits = {"fuel": 1}


def test_real_templates_use_a_small_part_of_the_default_fuel():
    """The default fuel leaves a wide margin on every fixture template and conversation."""
    from _parity import conversation_files, fixture_tokenizers, oracle, template_kwargs
    from conftest import require_shared

    from chatmask import _core

    tokenizers_dir = require_shared("fixtures", "tokenizers")
    require_shared("fixtures", "conversations")
    _core.peak_render_fuel(reset=True)  # other tests in this process render huge inputs
    renders = 0
    for name in fixture_tokenizers():
        tok = chatmask.ChatTokenizer.from_pretrained(tokenizers_dir / name)
        for path in conversation_files():
            for row in oracle().read_conversations(path):
                try:
                    tok.apply_chat_template(row["messages"], tokenize=False, **template_kwargs(row))
                except chatmask.TemplateLimitError:
                    raise
                except chatmask.ChatMaskError:
                    continue
                renders += 1
    peak = _core.peak_render_fuel()
    fuel = chatmask.RenderLimits().fuel
    print(f"\n[fuel] {renders} renders of the fixture corpus, peak fuel {peak:,} of the default {fuel:,}")
    assert renders > 10_000
    assert 0 < peak * 100 < fuel


PANIC = "{{ _chatmask_panic_for_tests('deliberate test panic') }}"


def test_panic_in_a_render_is_a_chatmask_error():
    tok = from_template(PANIC)
    calls = [
        lambda: tok.tokenize_for_trainer(CHAT),
        lambda: tok.tokenize_for_trainer(CHAT, mode="all"),
        lambda: tok.apply_chat_template(CHAT, tokenize=False),
        lambda: tok.apply_chat_template(CHAT, return_assistant_tokens_mask=True),
        lambda: tok.tokenize_batch([CHAT], num_threads=1),
        lambda: tok.tokenize_batch([CHAT] * 50, num_threads=2),
    ]
    for call in calls:
        try:
            call()
        except Exception as e:  # a PanicException would escape this clause
            assert type(e) is chatmask.ChatMaskError and "deliberate test panic" in str(e), repr(e)
        else:
            pytest.fail("the panic was swallowed")


@pytest.mark.parametrize("threads", [1, 2])
def test_panic_in_batch_workers_fails_only_the_rows(threads):
    # The template panics for rows whose first message says so; the other rows must be intact.
    source = (
        "{% if messages[0].content == 'panic' %}{{ _chatmask_panic_for_tests('row panic') }}{% endif %}"
        + chatmask._core.DEMO_CHAT_TEMPLATE
    )
    tok = from_template(source)
    good = [r["messages"] for r in demo_conversations()[:8] if r["messages"][0]["role"] != "assistant"]
    bad = [{"role": "user", "content": "panic"}, {"role": "assistant", "content": "x"}]
    rows = [good[i % len(good)] if i % 3 else bad for i in range(300)]
    batch = tok.tokenize_batch(rows, mode="all", on_error="skip", num_threads=threads)
    assert [row for row, _ in batch.errors] == list(range(0, 300, 3))
    assert all("row panic" in message for _, message in batch.errors)
    want = tok.tokenize_batch([r for i, r in enumerate(rows) if i % 3], mode="all", num_threads=threads)
    assert batch.to_list() == want.to_list() and len(batch) == 200
    with pytest.raises(chatmask.ChatMaskError, match="row 0: .*row panic") as info:
        tok.tokenize_batch(rows, mode="all", num_threads=threads)
    assert info.value.row == 0


def test_panics_from_many_python_threads():
    tok = from_template(PANIC)
    plain = from_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    outcomes: list[str] = []

    def worker():
        for _ in range(20):
            try:
                tok.tokenize_batch([CHAT] * 10, num_threads=2)
            except chatmask.ChatMaskError:
                outcomes.append("error")
            outcomes.append("ok" if plain.apply_chat_template(CHAT, tokenize=False) == "hihello" else "bad")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("error") == 80 and outcomes.count("ok") == 80 and "bad" not in outcomes


def test_syntax_errors_and_raise_exception_in_batches():
    with pytest.raises(chatmask.TemplateSyntaxError, match="line 3"):
        from_template("a\nb\n{% for %}")
    tok = from_template(
        "{% if messages|length > 2 %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}x"
    )
    batch = tok.tokenize_batch([CHAT, CHAT + [{"role": "user", "content": "again"}]], on_error="skip")
    assert batch.errors == [(1, "Conversation roles must alternate")]
    assert len(batch) == 1
