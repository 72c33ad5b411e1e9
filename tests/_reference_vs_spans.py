"""The reference's prefix-count labels measured against chatmask's exact message spans.

The reference (atropos' ``tokenize_for_trainer``) finds what to train by *counting tokens of
prefix renders*: in mode ``all`` assistant turn ``i`` trains the full render's tokens
``[len(tok(render(chat[:i], add_generation_prompt=True))), len(tok(render(chat[:i+1]))))``;
``last`` trains everything after ``len(tok(render(chat[:-1], add_generation_prompt=True)))``;
``multistep`` trains the last assistant turn's prefix-count range. That is only right when
every prefix render it uses is a string prefix of the full render. This module does two things:

1. ``compare_exact_row`` -- on rows where the reference *is* exact for mode ``all`` (every
   prefix render it uses is a string prefix of the full render), compare its masks with
   chatmask's span labels (default :class:`chatmask.MaskPolicy`) token by token and put every
   difference in a named category (``EXPLAINED``); anything else is ``unexplained``.
2. ``measure_row`` -- on every row, per mode, decide whether the reference's masks are *wrong*
   measured against the spans (see ``measure_row``), and tally it (``ErrorTally``), which
   ``benches/reference_errors.py`` prints as a table.

Runnable on its own as the difference survey::

    python tests/_reference_vs_spans.py [--limit N] [--tokenizers a,b] [--files x.jsonl,...]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _parity import CONVERSATIONS_DIR, TOKENIZERS_DIR, oracle, template_kwargs  # noqa: E402

MODES = ("last", "all", "multistep")
ASSISTANT_ROLES = ("assistant", "agent")  # the reference's UNMASKED_ROLES
IGNORE = -100

#: Differences between the reference's mode-``all`` masks and chatmask's span labels that are
#: understood (on rows where the reference's prefix renders are exact):
EXPLAINED = {
    "after_end_of_turn": (
        "template text after an assistant turn's end-of-turn token that render(chat[:i+1]) ends with "
        "(ChatML's '\\n' after <|im_end|>): the reference trains it, chatmask gives it to no message"
    ),
    "fieldless_assistant": (
        "an assistant message with no text field in the render (content '' and no rendered tool call or "
        "reasoning): the reference trains its turn ([generation prompt end, end of render(chat[:i+1])), "
        "e.g. '<|im_end|>\\n'); chatmask finds no span for it and trains nothing"
    ),
}


# --------------------------------------------------------------------------------------------
# Loading and rendering


def base_tokenizer_names() -> list[str]:
    """The fixture tokenizers that are not ``*-gen`` copies."""
    if not TOKENIZERS_DIR.exists():
        return ["qwen3"]  # collected anyway, so a missing ../shared fails under CI
    return sorted(
        p.name for p in TOKENIZERS_DIR.iterdir() if (p / "tokenizer.json").exists() and not p.name.endswith("-gen")
    )


def conversation_paths(names: Iterable[str] | None = None) -> list[Path]:
    if names is None:
        return sorted(CONVERSATIONS_DIR.glob("*.jsonl"))
    return [CONVERSATIONS_DIR / n for n in names]


def load_pair(name: str) -> tuple[Any, Any]:
    """(transformers tokenizer as the oracle loads it, chatmask on it with the native renderer)."""
    from _differential import native_core, reference_tokenizer

    return reference_tokenizer(name), native_core(name)


def read_rows(path: Path, limit: int | None, spread: bool = False) -> Iterable[tuple[str, dict]]:
    """(id, row) of the first `limit` rows (all if None), or with `spread` `limit` rows evenly
    spaced over the file (the files are grouped by feature, so the first rows are all alike)."""
    rows = oracle().read_conversations(path)
    if spread and limit is not None:
        rows = list(rows)
        picked = sorted({int(k * len(rows) / limit) for k in range(min(limit, len(rows)))})
        chosen = [(i, rows[i]) for i in picked]
    else:
        chosen = enumerate(rows)
    for n, (i, row) in enumerate(chosen):
        if limit is not None and n >= limit:
            break
        yield row.get("id", f"{path.stem}-{i}"), row


def _render(cm, chat, generation_prompt: bool, kwargs: dict) -> str:
    return cm.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def is_assistant(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in ASSISTANT_ROLES


def run_reference(ref_tok, chat, mode: str, kwargs: dict):
    """The oracle's (output, None) or (None, exception), stdout silenced."""
    from _differential import run_reference as run

    return run(ref_tok, chat, mode, **kwargs)


class ReferenceRuns:
    """The reference on one row, each mode run at most once (shared by the comparison and the measurement)."""

    def __init__(self, ref_tok, chat: list, kwargs: dict) -> None:
        self._args = (ref_tok, chat, kwargs)
        self._runs: dict[str, tuple[Any, BaseException | None]] = {}

    def __call__(self, mode: str):
        if mode not in self._runs:
            ref_tok, chat, kwargs = self._args
            self._runs[mode] = run_reference(ref_tok, chat, mode, kwargs)
        return self._runs[mode]


def _field_spans(spans) -> dict[int, list[tuple[int, int]]]:
    """Non-empty field spans by message index."""
    by_message: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
    for message, _kind, start, end in spans:
        if end > start:
            by_message[message].append((start, end))
    return by_message


# --------------------------------------------------------------------------------------------
# 1. Rows where the reference is exact: every difference explained


@dataclass
class ExactTally:
    rows_seen: int = 0
    rows_compared: int = 0
    tokens_compared: int = 0
    rows_with_differences: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)  # why a row was not compared
    tokens_by_category: collections.Counter = field(default_factory=collections.Counter)
    rows_by_category: collections.Counter = field(default_factory=collections.Counter)
    unexplained: list[str] = field(default_factory=list)

    def add(self, other: "ExactTally") -> None:
        self.rows_seen += other.rows_seen
        self.rows_compared += other.rows_compared
        self.tokens_compared += other.tokens_compared
        self.rows_with_differences += other.rows_with_differences
        self.skipped.update(other.skipped)
        self.tokens_by_category.update(other.tokens_by_category)
        self.rows_by_category.update(other.rows_by_category)
        self.unexplained.extend(other.unexplained)

    def summary(self, label: str) -> str:
        cats = (
            ", ".join(
                f"{c}: {self.tokens_by_category[c]} tokens in {self.rows_by_category[c]} rows"
                for c in sorted(self.tokens_by_category)
            )
            or "none"
        )
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{label}: {self.rows_compared}/{self.rows_seen} rows compared ({self.tokens_compared} tokens), "
            f"{self.rows_with_differences} rows with differences; differences: {cats}; "
            f"unexplained: {len(self.unexplained)}; not compared: {skipped}"
        )


def exact_prefix_renders(cm, chat: list, kwargs: dict) -> tuple[str | None, str]:
    """The full render if every prefix render mode ``all`` uses is a string prefix of it."""
    try:
        full = _render(cm, chat, False, kwargs)
        for i, message in enumerate(chat):
            if not is_assistant(message):
                continue
            if not full.startswith(_render(cm, chat[:i], True, kwargs)):
                return None, "prefix_not_exact"
            if not full.startswith(_render(cm, chat[: i + 1], False, kwargs)):
                return None, "prefix_not_exact"
    except Exception as e:  # noqa: BLE001 - the template raises on some rows (Mistral's alternation)
        return None, f"render_raises:{type(e).__name__}"
    return full, ""


def _count(cm, chat, generation_prompt: bool, kwargs: dict) -> int:
    return len(cm._core.encode(_render(cm, chat, generation_prompt, kwargs)))


def compare_exact_row(ref_tok, cm, row_id: str, row: dict, reference: ReferenceRuns | None = None) -> ExactTally:
    """Compare mode ``all`` with span labels on one row, if the reference is exact on it."""
    tally = ExactTally(rows_seen=1)
    chat = row["messages"]
    kwargs = template_kwargs(row)
    full, why = exact_prefix_renders(cm, chat, kwargs)
    if full is None:
        tally.skipped[why] += 1
        return tally
    reference = reference or ReferenceRuns(ref_tok, chat, kwargs)
    want, err = reference("all")
    if err is not None:  # e.g. a leading assistant turn: render([]) raises in transformers
        tally.skipped[f"reference_raises:{type(err).__name__}"] += 1
        return tally
    out = cm.tokenize(chat, **kwargs)
    ids = out["input_ids"].tolist()
    labels = out["labels"].tolist()
    index = out["message_index"].tolist()
    where = f"{row_id}"
    if want["tokens"] != ids:
        tally.unexplained.append(f"{where}: reference tokens differ from chatmask's input_ids")
        return tally
    masks = want["masks"]
    if len(masks) != len(ids):
        tally.unexplained.append(f"{where}: reference masks length {len(masks)} != tokens {len(ids)}")
        return tally
    tally.rows_compared = 1
    tally.tokens_compared = len(ids)

    # The reference's ranges, rebuilt from token counts of the prefix renders (later turns
    # overwrite earlier ones, as in the reference); they must reproduce its trained set.
    owner = np.full(len(ids), -1, dtype=np.int64)
    for i, message in enumerate(chat):
        if is_assistant(message):
            a, b = _count(cm, chat[:i], True, kwargs), _count(cm, chat[: i + 1], False, kwargs)
            owner[a:b] = i
    ref_trained = np.array(masks) != IGNORE
    if not np.array_equal(ref_trained, owner >= 0):
        bad = int(np.flatnonzero(ref_trained != (owner >= 0))[0])
        tally.unexplained.append(f"{where}: prefix-count ranges do not reproduce the reference's mask (token {bad})")
        return tally

    _, spans, _ = cm._core.message_spans(chat, **kwargs)
    fields = _field_spans(spans)
    trained_by_cm = np.array(labels) != IGNORE
    pieces = None
    categories: collections.Counter = collections.Counter()
    for t in np.flatnonzero(np.array(masks) != np.array(labels)).tolist():
        i = int(owner[t])
        category = None
        if masks[t] != IGNORE and labels[t] == IGNORE and i >= 0:
            in_range = np.flatnonzero(owner == i)
            cm_in_range = in_range[trained_by_cm[in_range]]
            if not fields.get(i):
                if not cm_in_range.size and index[t] in (-1, i):
                    category = "fieldless_assistant"
            elif index[t] == -1 and cm_in_range.size and t > cm_in_range[-1]:
                category = "after_end_of_turn"
        if category is None:
            if pieces is None:
                pieces = cm._core.decode(ids, per_token=True)
            lo, hi = max(0, t - 4), min(len(ids), t + 3)
            context = " ".join(
                f"{pieces[k]!r}[ref={'T' if masks[k] != IGNORE else '-'} cm={'T' if labels[k] != IGNORE else '-'} "
                f"msg={index[k]}]"
                for k in range(lo, hi)
            )
            owner_role = chat[i].get("role") if i >= 0 else None
            index_role = chat[index[t]].get("role") if index[t] >= 0 else None
            tally.unexplained.append(
                f"{where} token {t} {pieces[t]!r}: reference {masks[t]}, chatmask {labels[t]}; reference range of "
                f"message {i} ({owner_role}), message_index {index[t]} ({index_role}), fields of message {i}: "
                f"{len(fields.get(i, []))} :: {context}"
            )
            continue
        categories[category] += 1
    if categories:
        tally.tokens_by_category.update(categories)
        tally.rows_by_category.update(categories.keys())
    if categories or len(tally.unexplained):
        tally.rows_with_differences = 1
    return tally


def compare_exact_file(ref_tok, cm, path: Path, limit: int | None, spread: bool = False) -> ExactTally:
    tally = ExactTally()
    for row_id, row in read_rows(path, limit, spread):
        tally.add(compare_exact_row(ref_tok, cm, row_id, row))
    return tally


# --------------------------------------------------------------------------------------------
# 2. Where the reference is wrong, measured against the spans


#: Why a row counts as wrong (a row may have several).
WRONG_REASONS = (
    "raises",  # the reference raises where chatmask's span method succeeds
    "length",  # len(masks) != len(tokens)
    "untrained_target_field",  # a token overlapping a field of a targeted message is left untrained
    "trains_non_target",  # a trained token belongs to a message the mode does not target
    "label_not_token",  # a trained label is not the token id at that position
)


@dataclass
class ErrorTally:
    rows: int = 0
    wrong: int = 0
    template_text_only: int = 0
    both_raise: int = 0
    chatmask_raises: int = 0  # chatmask raises (not counted as wrong: nothing to measure against)
    reasons: collections.Counter = field(default_factory=collections.Counter)
    non_target_roles: collections.Counter = field(default_factory=collections.Counter)  # rows by role trained
    # wrong rows whose only fault is trained tokens that chatmask's message_index gives to a
    # non-target message but that lie before that message's first field (its header region)
    non_target_before_field_only: int = 0
    unmeasurable: list[str] = field(default_factory=list)  # tokens differ: a parity bug, not a measurement
    examples: list[str] = field(default_factory=list)

    def add(self, other: "ErrorTally") -> None:
        self.rows += other.rows
        self.wrong += other.wrong
        self.template_text_only += other.template_text_only
        self.both_raise += other.both_raise
        self.chatmask_raises += other.chatmask_raises
        self.reasons.update(other.reasons)
        self.non_target_roles.update(other.non_target_roles)
        self.non_target_before_field_only += other.non_target_before_field_only
        self.unmeasurable.extend(other.unmeasurable)
        self.examples.extend(other.examples[: max(0, 20 - len(self.examples))])


def targets(chat: list, mode: str) -> set[int]:
    """The messages a mode is meant to train: every assistant turn (all) or the last one."""
    assistants = [i for i, m in enumerate(chat) if is_assistant(m)]
    if mode == "all":
        return set(assistants)
    return set(assistants[-1:])


@dataclass
class SpanView:
    """chatmask's side of one row, computed once for the three modes."""

    ids: list[int] | None = None
    message_index: np.ndarray | None = None
    field_tokens: dict[int, np.ndarray] | None = None  # message -> indices of tokens overlapping its fields
    first_field_token: np.ndarray | None = None  # per message: its first field token, or len(ids)
    error: BaseException | None = None


def span_view(cm, chat: list, kwargs: dict) -> SpanView:
    try:
        out = cm.tokenize(chat, **kwargs)
        text, spans, _ = cm._core.message_spans(chat, **kwargs)
        ids, positions, _, _ = cm._core.positions(text)
    except Exception as e:  # noqa: BLE001 - compared with the reference's own raise
        return SpanView(error=e)
    if list(ids) != out["input_ids"].tolist():
        raise AssertionError("positions() and tokenize() encode the render differently")
    pos = np.asarray(positions, dtype=np.int64).reshape(-1, 2)
    starts, ends = pos[:, 0], pos[:, 1]
    nonempty = ends > starts
    field_tokens = {}
    for message, ranges in _field_spans(spans).items():
        hit = np.zeros(len(ids), dtype=bool)
        for s, e in ranges:
            hit |= nonempty & (starts < e) & (ends > s)
        field_tokens[message] = np.flatnonzero(hit)
    first = np.full(len(chat), len(ids), dtype=np.int64)
    for message, hit in field_tokens.items():
        if hit.size and 0 <= message < len(chat):
            first[message] = hit[0]
    return SpanView(
        ids=out["input_ids"].tolist(),
        message_index=out["message_index"],
        field_tokens=field_tokens,
        first_field_token=first,
    )


def _template_raise(exc: BaseException) -> bool:
    import chatmask

    return isinstance(exc, chatmask.TemplateError)


def measure_row(
    ref_tok,
    view: SpanView,
    chat: list,
    mode: str,
    kwargs: dict,
    row_id: str = "",
    reference: ReferenceRuns | None = None,
) -> ErrorTally:
    """One row, one mode. Wrong when the reference:

    * raises where chatmask's span method succeeds;
    * returns masks of another length than its tokens;
    * leaves untrained a token overlapping a field span (content, reasoning, tool call) of a
      message its mode targets (``all``: every assistant turn; ``last``/``multistep``: the last);
    * trains a token whose ``message_index`` is a message it does not target (user, system, tool
      text or another assistant turn), or trains a label that is not the token at that position.

    Not wrong but counted (``template_text_only``): it trains template text (``message_index``
    -1, e.g. the ``\\n`` after ``<|im_end|>``). Both raising (chatmask's template too) is
    ``both_raise``; chatmask raising alone is ``chatmask_raises``.
    """
    tally = ErrorTally(rows=1)
    want, err = (reference or ReferenceRuns(ref_tok, chat, kwargs))(mode)
    if err is not None:
        if view.error is None:
            tally.wrong = 1
            tally.reasons["raises"] += 1
            tally.examples.append(f"{row_id} {mode}: reference raised {type(err).__name__}: {str(err)[:120]}")
        elif _template_raise(view.error):
            tally.both_raise = 1
        else:
            tally.chatmask_raises = 1
            tally.examples.append(f"{row_id} {mode}: both raise, chatmask not in the template: {view.error!r}"[:300])
        return tally
    if view.error is not None:
        tally.chatmask_raises = 1
        tally.examples.append(f"{row_id} {mode}: chatmask raised {view.error!r}"[:300])
        return tally
    tokens, masks = want["tokens"], want["masks"]
    if tokens != view.ids:
        tally.unmeasurable.append(f"{row_id} {mode}: reference tokens differ from chatmask's input_ids")
        return tally
    reasons = []
    if len(masks) != len(tokens):
        reasons.append("length")
        masks = (list(masks) + [IGNORE] * len(tokens))[: len(tokens)]
    m = np.asarray(masks, dtype=np.int64)
    trained = m != IGNORE
    wanted = targets(chat, mode)
    for message in sorted(wanted):
        hit = view.field_tokens.get(message)
        if hit is not None and hit.size and not trained[hit].all():
            reasons.append("untrained_target_field")
            break
    index = view.message_index
    foreign = trained & (index >= 0) & ~np.isin(index, list(wanted))
    before_field = False
    if foreign.any():
        reasons.append("trains_non_target")
        roles = {chat[message].get("role") for message in set(index[foreign].tolist())}
        tally.non_target_roles.update({"other assistant" if r in ASSISTANT_ROLES else str(r) for r in roles})
        where = np.flatnonzero(foreign)
        before_field = (where < view.first_field_token[index[where]]).all()
    if (m[trained] != np.asarray(tokens, dtype=np.int64)[trained]).any():
        reasons.append("label_not_token")
    if reasons:
        tally.wrong = 1
        tally.reasons.update(reasons)
        tally.non_target_before_field_only = int(reasons == ["trains_non_target"] and before_field)
        if len(tally.examples) < 1:
            tally.examples.append(f"{row_id} {mode}: {', '.join(reasons)}")
    elif (trained & (index < 0)).any():
        tally.template_text_only = 1
    return tally


def measure_file(
    ref_tok, cm, path: Path, limit: int | None, modes=MODES, spread: bool = False
) -> dict[str, ErrorTally]:
    return analyse_file(ref_tok, cm, path, limit, modes=modes, exact=False, spread=spread)[1]


def analyse_file(
    ref_tok, cm, path: Path, limit: int | None, modes=MODES, exact: bool = True, spread: bool = False
) -> tuple[ExactTally, dict[str, ErrorTally]]:
    """Both analyses on `limit` rows of a file (see `read_rows`), the reference run once per row and mode."""
    exact_tally = ExactTally()
    tallies = {mode: ErrorTally() for mode in modes}
    for row_id, row in read_rows(path, limit, spread):
        chat = row["messages"]
        kwargs = template_kwargs(row)
        reference = ReferenceRuns(ref_tok, chat, kwargs)
        if exact:
            exact_tally.add(compare_exact_row(ref_tok, cm, row_id, row, reference))
        if modes:
            view = span_view(cm, chat, kwargs)
            for mode in modes:
                tallies[mode].add(measure_row(ref_tok, view, chat, mode, kwargs, row_id, reference))
    return exact_tally, tallies


def error_table(results: dict[str, dict[str, ErrorTally]]) -> str:
    """results[tokenizer][mode] as a fixed-width table.

    wrong% is of the rows both sides could tokenize; hdr-only counts wrong rows whose only fault
    is trained tokens that message_index gives to a non-target message before that message's
    first field (its header region; see ``ErrorTally.non_target_before_field_only``).
    """
    head = (
        f"{'tokenizer':18} {'mode':9} {'rows':>6} {'wrong':>6} {'wrong%':>7} {'tmpl-only':>9} "
        f"{'both-raise':>10} {'cm-raises':>9} {'hdr-only':>8}  wrong reasons (rows) / non-target roles trained (rows)"
    )
    lines = [head, "-" * len(head)]
    for name, by_mode in results.items():
        for mode, t in by_mode.items():
            measured = t.rows - t.both_raise - t.chatmask_raises
            pct = f"{100 * t.wrong / measured:.1f}" if measured else "-"
            reasons = ", ".join(f"{r} {t.reasons[r]}" for r in WRONG_REASONS if t.reasons[r])
            roles = ", ".join(f"{r} {n}" for r, n in sorted(t.non_target_roles.items()))
            lines.append(
                f"{name:18} {mode:9} {t.rows:6} {t.wrong:6} {pct:>7} {t.template_text_only:9} "
                f"{t.both_raise:10} {t.chatmask_raises:9} {t.non_target_before_field_only:8}  "
                f"{reasons}{' / ' + roles if roles else ''}"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Survey of reference-vs-spans differences on exact rows (mode all).")
    ap.add_argument("--limit", type=int, default=None, help="rows per file")
    ap.add_argument("--spread", action="store_true", help="--limit rows evenly spaced over each file, not the first")
    ap.add_argument("--tokenizers", default=None)
    ap.add_argument("--files", default=None)
    ap.add_argument("--show", type=int, default=10, help="unexplained differences to print per file")
    args = ap.parse_args(argv)
    names = args.tokenizers.split(",") if args.tokenizers else base_tokenizer_names()
    paths = conversation_paths(args.files.split(",") if args.files else None)
    total = ExactTally()
    for name in names:
        ref_tok, cm = load_pair(name)
        for path in paths:
            t0 = time.perf_counter()
            t = compare_exact_file(ref_tok, cm, path, args.limit, args.spread)
            total.add(t)
            print(t.summary(f"{name} {path.name}") + f" [{time.perf_counter() - t0:.1f}s]", flush=True)
            for line in t.unexplained[: args.show]:
                print("   ", line[:600], flush=True)
    print(total.summary("TOTAL"))
    return 1 if total.unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
