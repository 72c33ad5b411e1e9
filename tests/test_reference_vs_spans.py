"""The reference's prefix-count labels against chatmask's span labels (see ``_reference_vs_spans``).

* Where the reference is exact for mode ``all`` (every prefix render it uses is a string prefix
  of the full render), its masks and chatmask's labels (default ``MaskPolicy``) are compared
  element by element and every difference must fall in an explained category
  (``_reference_vs_spans.EXPLAINED``); any other difference fails.
* On every row, each mode's masks are measured against the spans (wrong / template text only /
  both raise); the test checks the measurement runs and sees the reference's known flaw, and
  prints the table. ``benches/reference_errors.py`` prints it for the whole corpus.

CI runs CHATMASK_SPANS_ROWS (default 15) rows of each file, evenly spaced over it (the files are
grouped by feature: the first rows of the edge-case file are all huge single turns), for each
non-``-gen`` fixture tokenizer; ``pytest -m slow`` runs the comparison on every row. Counts
print with -s.
"""

from __future__ import annotations

import collections
import os

import _reference_vs_spans as rvs
import pytest
from conftest import conversation_file_names, require_shared

ROWS = int(os.environ.get("CHATMASK_SPANS_ROWS", "15"))
NAMES = rvs.base_tokenizer_names()

# Summed over the tests of a run, printed as each test finishes (pytest -s).
EXACT_TOTAL = rvs.ExactTally()
ERROR_TOTALS: dict[str, dict[str, rvs.ErrorTally]] = collections.defaultdict(
    lambda: {m: rvs.ErrorTally() for m in rvs.MODES}
)


def _pair(name: str, file: str):
    require_shared("reference", "oracle.py")
    path = require_shared("fixtures", "conversations", file)
    require_shared("fixtures", "tokenizers", name)
    ref_tok, cm = rvs.load_pair(name)
    return ref_tok, cm, path


def _check_exact(name: str, file: str, tally: rvs.ExactTally) -> None:
    EXACT_TOTAL.add(tally)
    print(tally.summary(f"{name} {file}"))
    print(EXACT_TOTAL.summary("running total"))
    assert tally.rows_seen > 0, "no rows read"
    assert not tally.unexplained, f"{len(tally.unexplained)} unexplained differences:\n" + "\n".join(
        line[:800] for line in tally.unexplained[:10]
    )


@pytest.mark.parametrize("file", conversation_file_names())
@pytest.mark.parametrize("name", NAMES)
def test_reference_vs_spans_sample(name: str, file: str) -> None:
    ref_tok, cm, path = _pair(name, file)
    exact, errors = rvs.analyse_file(ref_tok, cm, path, ROWS, spread=True)
    for mode, t in errors.items():
        ERROR_TOTALS[name][mode].add(t)
    print(f"\n{rvs.error_table({f'{name} (so far)': ERROR_TOTALS[name]})}")
    _check_exact(name, file, exact)
    if file == "alpaca_single_turn.jsonl":  # single turns: exact for every fixture template
        assert exact.rows_compared > 0 and exact.tokens_compared > 0

    for mode, t in errors.items():
        assert t.rows > 0
        assert t.wrong + t.template_text_only + t.both_raise + t.chatmask_raises <= t.rows
        assert not t.unmeasurable, "\n".join(t.unmeasurable[:5])
        assert not t.chatmask_raises, "\n".join(t.examples[:5])

    # The measurement sees what is known about the reference on these rows.
    if name == "qwen3" and file == "sharegpt_multiturn.jsonl":
        # Qwen3 gives an assistant turn empty <think></think> tags only when it is after the last
        # user query: render(chat[:i+1]) has them, the full render not, so the counts of mode
        # "all" run past each earlier turn into the next user message.
        assert errors["all"].wrong > 0 and errors["all"].reasons["trains_non_target"] > 0
    if name in ("qwen3", "smollm3-on-qwen3") and file == "alpaca_single_turn.jsonl":
        # One exact turn each: never wrong, and the "\n" after <|im_end|> is trained template text.
        for t in errors.values():
            assert t.wrong == 0 and t.template_text_only == t.rows
    if file == "alpaca_single_turn.jsonl":
        assert exact.tokens_by_category.keys() <= {"after_end_of_turn"}


@pytest.mark.slow
@pytest.mark.parametrize("file", conversation_file_names())
@pytest.mark.parametrize("name", NAMES)
def test_reference_vs_spans_every_row(name: str, file: str) -> None:
    ref_tok, cm, path = _pair(name, file)
    exact, _ = rvs.analyse_file(ref_tok, cm, path, None, modes=())
    _check_exact(name, file, exact)
    if file == "alpaca_single_turn.jsonl":  # single turns: exact for every fixture template
        assert exact.rows_compared > 0 and exact.tokens_compared > 0
