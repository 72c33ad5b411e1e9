"""One call of chatmask against the reference oracle: equal outputs, or both raise alike.

Shared by ``test_bad_input.py`` and ``test_fuzz.py``. Unlike ``_parity.raised_alike`` (the corpus
parity's rule, which only ever sees template raises and the reference's own failures), this maps
*every* exception the reference can raise on bad input onto the chatmask class that corresponds:

========================================================  ===================================
reference raises                                          chatmask must raise
========================================================  ===================================
``jinja2.TemplateError`` from ``raise_exception``          ``TemplateError``, same message
any other exception raised inside the template             ``TemplateError`` (``UndefinedError``,
(``UndefinedError``, ``TypeError: can only concatenate``)  Python ``TypeError`` in an operator)
``AttributeError`` / ``TypeError`` outside the template   ``ConversationTypeError`` (a chat or
(``'str' object has no attribute 'items'``, ``'NoneType'   a message of the wrong type, or a lone
object is not iterable``, the tokenizer's ``TextEncode     surrogate)
Input must be ...`` on a lone surrogate)
``KeyError: 'role'``, ``ValueError`` (empty conversation,  ``ConversationError``
numpy broadcast), ``IndexError`` (``tokens[-1]``)
``RecursionError`` (nesting too deep for Python)           any ``ChatMaskError``
========================================================  ===================================
"""

from __future__ import annotations

import contextlib
import functools
import io
from dataclasses import dataclass
from typing import Any

from _parity import oracle

import chatmask

MODES = ("last", "all", "multistep")
FINISH_REASONS = ("", "length")


@functools.lru_cache(maxsize=None)
def reference_tokenizer(name: str):
    """The fixture tokenizer on transformers, as the oracle loads it (missing: skip, or fail in CI)."""
    from conftest import require_shared

    require_shared("reference", "oracle.py")
    require_shared("fixtures", "tokenizers", name)
    return oracle().load_tokenizer(name)


@functools.lru_cache(maxsize=None)
def native_core(name: str) -> chatmask.ChatTokenizer:
    """chatmask on the same tokenizer, pinned to the native renderer (verify=0: no Jinja2 switch)."""
    core = chatmask.ChatTokenizer.from_transformers(reference_tokenizer(name), verify=0)
    assert core.render_backend == "minijinja", f"{name} is not rendered natively"
    return core


def _frames(exc: BaseException) -> list[str]:
    names = []
    tb = exc.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return names


def raised_in_template(exc: BaseException) -> bool:
    import jinja2

    return isinstance(exc, jinja2.TemplateError) or "<template>" in _frames(exc)


def expected_class(exc: BaseException) -> tuple[type[BaseException], bool]:
    """The chatmask class the reference's exception corresponds to, and whether the message must match."""
    import jinja2

    if type(exc) is jinja2.exceptions.TemplateError:  # raise_exception(...): the template's own words
        return chatmask.TemplateError, True
    if raised_in_template(exc):
        return chatmask.TemplateError, False
    if isinstance(exc, RecursionError):
        return chatmask.ChatMaskError, False
    if isinstance(exc, (AttributeError, TypeError)):  # outside the template: the input's shape or a surrogate
        return chatmask.ConversationTypeError, False
    if isinstance(exc, (KeyError, ValueError, IndexError)):
        return chatmask.ConversationError, isinstance(exc, ValueError) and "empty conversation" in str(exc)
    raise AssertionError(f"the reference raised an exception this test does not know: {exc!r}")


def run_reference(tok: Any, chat: Any, mode: str, finish: str = "", **kwargs: Any):
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the reference prints "bad token"
            return oracle().reference(tok, chat, mode=mode, finish_reason=finish, **kwargs), None
    except Exception as e:  # noqa: BLE001 - compared, not hidden
        return None, e


def run_chatmask(tok: Any, chat: Any, mode: str, finish: str = "", **kwargs: Any):
    try:
        if mode == "multistep":
            return chatmask.tokenize_for_trainer_multistep(tok, chat, finish_reason=finish, **kwargs), None
        return (
            chatmask.tokenize_for_trainer(
                tok, chat, train_on_all_assistant_turns=(mode == "all"), finish_reason=finish, **kwargs
            ),
            None,
        )
    except BaseException as e:  # noqa: BLE001 - a pyo3 PanicException is a BaseException
        if isinstance(e, KeyboardInterrupt):
            raise
        return None, e


def same_error(want: BaseException, got: BaseException) -> str | None:
    """None if `got` is the chatmask counterpart of the reference's `want`, else why not."""
    cls, message_must_match = expected_class(want)
    if not isinstance(got, cls):
        return f"reference raised {type(want).__name__}({want}), chatmask {type(got).__name__}({got}); wanted {cls.__name__}"
    if message_must_match and str(want) not in str(got):
        return f"message {str(want)!r} not in chatmask's {str(got)!r}"
    return None


def same_output(want: dict, got: dict) -> str | None:
    if set(want) != set(got):
        return f"keys {sorted(got)} != reference {sorted(want)}"
    for key in ("tokens", "masks"):
        w, g = want[key], got[key]
        if type(g) is not list or any(type(x) is not int for x in g):
            return f"{key} is not a list of int"
        if len(w) != len(g):
            return f"len({key}) {len(g)} != reference {len(w)}"
        bad = [i for i, (a, b) in enumerate(zip(w, g)) if a != b]
        if bad:
            i = bad[0]
            return f"{key} differ at {len(bad)} positions, first {i}: reference {w[i]}, chatmask {g[i]}"
    return None


@dataclass
class Outcome:
    """What one comparison saw: the reference's output (or None) and its exception (or None)."""

    output: dict | None
    error: BaseException | None
    chatmask_error: BaseException | None

    @property
    def tokens(self) -> int:
        return 0 if self.output is None else len(self.output["tokens"]) + len(self.output["masks"])


def compare(ref_tok: Any, cm_tok: Any, chat: Any, mode: str, finish: str = "", **kwargs: Any) -> Outcome:
    """Run both sides; AssertionError (with the case) unless they agree."""
    want, want_err = run_reference(ref_tok, chat, mode, finish, **kwargs)
    got, got_err = run_chatmask(cm_tok, chat, mode, finish, **kwargs)
    where = f"mode={mode} finish={finish!r}"
    if want_err is not None or got_err is not None:
        if want_err is None:
            raise AssertionError(
                f"{where}: reference returned {len(want['tokens'])} tokens, chatmask raised {got_err!r}"
            )
        if got_err is None:
            raise AssertionError(
                f"{where}: reference raised {want_err!r}, chatmask returned {len(got['tokens'])} tokens"
            )
        why = same_error(want_err, got_err)
        assert why is None, f"{where}: both raised, but {why}"
        return Outcome(None, want_err, got_err)
    why = same_output(want, got)
    assert why is None, f"{where}: {why}"
    return Outcome(want, None, None)


def compare_all_modes(ref_tok: Any, cm_tok: Any, chat: Any, modes=MODES, finish_reasons=FINISH_REASONS, **kwargs: Any):
    """compare() for every mode and finish_reason; the outcomes in that order."""
    return [compare(ref_tok, cm_tok, chat, m, f, **kwargs) for m in modes for f in finish_reasons]
