"""Preference pairs built from the fixture conversations, for tests/test_preference.py and
benches/preference.py.

Every conversation with at least two assistant messages gives one pair: the prompt is everything
before its last assistant message, chosen is that message, rejected is the last assistant text of
the next qualifying row (in file order, wrapping; the first one after it whose text is non-empty
and differs from chosen's).
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from _parity import conversation_files, oracle


def date_kwargs() -> dict[str, Any]:
    """The pinned date for templates that print one (as the parity tests use)."""
    return {"date_string": oracle().DATE_STRING}


def _last_assistant(messages: list[dict[str, Any]]) -> int | None:
    positions = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    return positions[-1] if len(positions) >= 2 else None


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def fixture_pairs(limit_per_file: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(row_id, explicit_row)` for the qualifying rows of every conversation file."""
    for path in conversation_files():
        with open(path, encoding="utf-8", newline="") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        qualifying = [(i, r, last) for i, r in enumerate(rows) if (last := _last_assistant(r["messages"])) is not None]
        texts = [_text(r["messages"][last]) for _, r, last in qualifying]
        taken = 0
        for k, (i, row, last) in enumerate(qualifying):
            if limit_per_file is not None and taken >= limit_per_file:
                break
            chosen = row["messages"][last]
            others = (texts[(k + j) % len(texts)] for j in range(1, len(texts)))
            rejected = next((t for t in others if t.strip() and t != _text(chosen)), None)
            if rejected is None:
                continue
            pair: dict[str, Any] = {
                "prompt": row["messages"][:last],
                "chosen": chosen,
                "rejected": {"role": "assistant", "content": rejected},
            }
            if row.get("tools"):
                pair["tools"] = row["tools"]
            taken += 1
            yield f"{path.name}:{i}", pair


def branches(pair: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The whole chosen and rejected conversations of an explicit pair built here."""
    return pair["prompt"] + [pair["chosen"]], pair["prompt"] + [pair["rejected"]]


def implicit(pair: dict[str, Any]) -> dict[str, Any]:
    """The same pair as an implicit row (two whole conversations)."""
    chosen, rejected = branches(pair)
    out: dict[str, Any] = {"chosen": chosen, "rejected": rejected}
    if "tools" in pair:
        out["tools"] = pair["tools"]
    return out


def trl_pair(tok: Any, pair: dict[str, Any], **kwargs: Any) -> dict[str, list[int]]:
    """TRL's DPO tokenization of a conversational pair, as ``DPOTrainer``'s ``tokenize_fn`` does it
    (trl main at f2cd577, 1.10.0.dev0: ``trl/trainer/dpo_trainer.py``, ``trl/data_utils.py``
    ``_tokenize``): the prompt rendered with ``add_generation_prompt=True``, prompt + chosen and
    prompt + rejected, each tokenized by ``apply_chat_template(tokenize=True)`` (transformers adds
    no special tokens there: the template's text carries BOS, so BOS is not doubled on this path;
    TRL's plain-text path, ``processing_class(text=...)``, does add them), the branches sliced at
    ``len(prompt_ids)``. A prompt that is not a token prefix only logs a warning in TRL and is
    sliced anyway, as here."""
    tools = pair.get("tools")
    chosen, rejected = branches(pair)
    prompt_ids = tok.apply_chat_template(pair["prompt"], tools=tools, add_generation_prompt=True, **kwargs)
    chosen_ids = tok.apply_chat_template(chosen, tools=tools, **kwargs)
    rejected_ids = tok.apply_chat_template(rejected, tools=tools, **kwargs)
    n = len(prompt_ids)
    return {
        "prompt_input_ids": list(prompt_ids),
        "chosen_input_ids": list(chosen_ids[n:]),
        "rejected_input_ids": list(rejected_ids[n:]),
        "prompt_render": tok.apply_chat_template(
            pair["prompt"], tools=tools, add_generation_prompt=True, tokenize=False, **kwargs
        ),
        "chosen_render": tok.apply_chat_template(chosen, tools=tools, tokenize=False, **kwargs),
        "chosen_full": list(chosen_ids),
        "rejected_full": list(rejected_ids),
    }


def trl_cause(tok: Any, trl: dict[str, Any]) -> str:
    """Why TRL's pair (from :func:`trl_pair`) differs from the exact one: ``BOS doubled`` (its
    prompt starts with two BOS), ``history rewritten`` (the prompt's render is not a text prefix of
    prompt + chosen), ``merge across the boundary`` (a text prefix, not a token prefix), or ``split
    elsewhere`` (a token prefix, but TRL's prompt ends elsewhere than the completion's first token)."""
    bos = tok.special_tokens.get("bos_token")
    bos_id = tok.encode(bos) if bos else []
    prompt = trl["prompt_input_ids"]
    if len(bos_id) == 1 and prompt[:2] == bos_id * 2:
        return "BOS doubled"
    if not trl["chosen_render"].startswith(trl["prompt_render"]):
        return "history rewritten"
    for full in (trl["chosen_full"], trl["rejected_full"]):
        if full[: len(prompt)] != prompt:
            return "merge across the boundary"
    return "split elsewhere"
