"""Bad input gives a clear chatmask exception (one hierarchy), never a crash."""

from __future__ import annotations

import pytest

import chatmask
from chatmask.demo import demo_tokenizer


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


def test_hierarchy():
    assert issubclass(chatmask.TemplateError, (chatmask.ChatMaskError, ValueError))
    assert issubclass(chatmask.TemplateSyntaxError, chatmask.TemplateError)
    assert issubclass(chatmask.ConversationTypeError, (chatmask.ChatMaskError, TypeError))
    assert issubclass(chatmask.ConversationError, (chatmask.ChatMaskError, ValueError))


@pytest.mark.parametrize(
    "chat, reason",
    [
        ("hello", "list of message dicts"),
        ([1, 2], "message 0 is a int, not a dict"),
        ([{"role": "user", "content": "\ud800"}], "lone surrogate"),
    ],
)
def test_wrong_types(tok, chat, reason):
    with pytest.raises(chatmask.ConversationTypeError, match=reason):
        tok.tokenize_for_trainer(chat)


def test_missing_role_in_all_turns_names_the_message():
    # A template that tolerates the missing role, so the reference's own chat[i]["role"] is what fails.
    tok = chatmask.ChatTokenizer.from_parts(
        chatmask.demo.demo_tokenizer_json(), "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    chat = [{"role": "user", "content": "a"}, {"content": "b"}]
    with pytest.raises(chatmask.ConversationError, match="message 1 has no 'role'"):
        tok.tokenize_for_trainer(chat, mode="all")
    assert tok.tokenize_for_trainer(chat, mode="last")["tokens"]


def test_raise_exception_message_passes_through():
    bad = chatmask.ChatTokenizer.from_parts(
        chatmask.demo.demo_tokenizer_json(), "{{ raise_exception('roles must alternate') }}"
    )
    with pytest.raises(chatmask.TemplateError, match="^roles must alternate$"):
        bad.tokenize_for_trainer([{"role": "user", "content": "x"}])


def test_syntax_error_names_the_line():
    with pytest.raises(chatmask.TemplateSyntaxError, match="line 2"):
        chatmask.ChatTokenizer.from_parts(chatmask.demo.demo_tokenizer_json(), "ok\n{% if %}")


def test_bad_tokenizer_json_and_objects():
    with pytest.raises(chatmask.TokenizerError, match="tokenizer.json"):
        chatmask.ChatTokenizer.from_parts('{"version": "1.0", "model": ')
    with pytest.raises(TypeError, match="fast tokenizer"):
        chatmask.tokenize_for_trainer(object(), [{"role": "user", "content": "x"}])
    with pytest.raises(chatmask.TokenizerError, match="not a local tokenizer directory"):
        chatmask.ChatTokenizer.from_pretrained("org/some-hub-id")


def test_bad_mode_and_on_error(tok):
    with pytest.raises(ValueError, match="mode must be"):
        tok.tokenize_for_trainer([{"role": "user", "content": "x"}], mode="first")
    with pytest.raises(ValueError, match="on_error"):
        tok.tokenize_batch([], on_error="ignore")
