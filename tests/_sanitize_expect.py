"""Expected ids of transformers' ``apply_chat_template(..., sanitize_control_tokens=True)``.

Writes JSONL for the Rust differential test in ``src/sanitize.rs`` (``sanitize_matches_transformers``):

* ``expect.jsonl``: for each fixture tokenizer, two synthetic ones made from qwen3, and each
  conversation file, the first rows with control strings injected into the messages (and sometimes
  into tools and ``date_string``), each with the ids transformers produces or the exception it raises;
* ``control_tokens.jsonl``: each tokenizer's control tokens for its template;
* ``literals.jsonl``: ``_get_template_literal_text`` of every template in ../shared/fixtures/templates.

    python tests/_sanitize_expect.py [--out DIR] [--limit N]
    CHATMASK_SANITIZE_EXPECT=DIR/expect.jsonl CARGO_TARGET_DIR=/tmp/sanitize-target \\
        cargo test --lib sanitize -- --ignored --nocapture

Not a pytest module: it needs only transformers and ../shared, not the built extension.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _parity import TOKENIZERS_DIR, conversation_files, fixture_tokenizers, oracle  # noqa: E402

START, END = "\U000f0000", "\U000f0001"
INJECTED_ROLES = ("user", "tool", "system")


def writable_copy(src: Path, dst: Path) -> Path:
    """Copy a fixture directory; the fixtures are read-only, and the copy gets edited."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=shutil.copyfile)
    dst.chmod(0o755)
    return dst


def synthetic_tokenizers(out: Path) -> list[Path]:
    """Variants of qwen3 for the cases no fixture has.

    ``qwen3-hello``: a special token "hello" that is also the vocab word, so plain text produces it
    (transformers' "Can't sanitize" ValueError), and a non-special whitespace token "\\n\\n", which
    the template writes but which never counts as a control token.
    ``qwen3-control-list``: ``chat_control_tokens`` in the config, so only the listed non-special
    tokens are control tokens and ``<think>`` in user text stays a token.
    """
    base = TOKENIZERS_DIR / "qwen3"
    made = []

    hello = writable_copy(base, out / "qwen3-hello")
    tj = json.loads((hello / "tokenizer.json").read_text(encoding="utf-8"))
    cfg = json.loads((hello / "tokenizer_config.json").read_text(encoding="utf-8"))
    next_id = max(max(t["id"] for t in tj["added_tokens"]), max(tj["model"]["vocab"].values())) + 1
    for content, token_id, special in (("hello", tj["model"]["vocab"]["hello"], True), ("\n\n", next_id, False)):
        entry = {
            "id": token_id,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": special,
        }
        tj["added_tokens"].append(entry)
        cfg["added_tokens_decoder"][str(token_id)] = {k: v for k, v in entry.items() if k != "id"}
    (hello / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (hello / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    made.append(hello)

    listed = writable_copy(base, out / "qwen3-control-list")
    cfg = json.loads((listed / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_control_tokens"] = ["<tool_call>", "</tool_call>", "not an added token"]
    (listed / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    made.append(listed)
    return made


def probes(tok, template: str) -> list[str]:
    """Strings to inject: control tokens and other added tokens, whole, split by a marker (the marker
    is dropped, so the token forms again), forged as already marked, doubled, and lone markers."""
    from transformers.utils.chat_template_utils import _get_template_literal_text

    control = list(tok._get_control_tokens(template))
    added = list(tok.added_tokens_encoder)
    literal = _get_template_literal_text(template)
    named = [v for v in tok.special_tokens_map.values() if isinstance(v, str)]
    in_template = [t for t in added if t in literal]
    others = [t for t in added if t not in set(control)]
    picked = list(dict.fromkeys(in_template + named + control[:: max(1, len(control) // 6)] + others[:3]))
    out = []
    for t in picked:
        k = max(1, len(t) // 2)
        out += [t, t[:k] + START + t[k:], START + t + END, "x" + t + t + "y", t[:k]]
    out += [START, END, "a" + START + "b", END + "<|" + START, "tail" + START]
    return out


def inject(text: str, probe: str, where: int) -> str:
    if where == 0:
        return probe + text
    if where == 1:
        return text + probe
    mid = len(text) // 2
    return text[:mid] + probe + text[mid:]


def injected_row(row: dict, row_idx: int, file_idx: int, probe_list: list[str]) -> tuple[list, list | None, dict]:
    messages = copy.deepcopy(row["messages"])
    seed = row_idx * 7 + file_idx * 13
    for i, msg in enumerate(messages):
        # Assistant text too on odd rows: templates split it (qwen3's `</think>` handling), which
        # separates the markers around a token.
        roles = INJECTED_ROLES + (("assistant",) if row_idx % 2 else ())
        if msg.get("role") not in roles or not isinstance(msg.get("content"), str):
            continue
        for j in range(1 + (seed + i) % 2):
            probe = probe_list[(seed + 5 * i + 11 * j) % len(probe_list)]
            msg["content"] = inject(msg["content"], probe, (seed + i + j) % 3)
    tools = copy.deepcopy(row.get("tools")) or None
    if tools and isinstance(tools[0], dict):
        fn = tools[0].get("function", tools[0])
        if isinstance(fn.get("description"), str):
            fn["description"] = inject(fn["description"], probe_list[(seed + 3) % len(probe_list)], seed % 3)
    kwargs = {"date_string": oracle().DATE_STRING, "add_generation_prompt": row_idx % 4 == 3}
    if row_idx % 5 == 2:
        kwargs["date_string"] += probe_list[seed % len(probe_list)]
    return messages, tools, kwargs


def write_literals(path: Path) -> int:
    from transformers.utils.chat_template_utils import _get_template_literal_text

    templates = sorted((TOKENIZERS_DIR.parent / "templates").glob("*.jinja"))
    with open(path, "w", encoding="utf-8") as sink:
        for t in templates:
            source = t.read_text(encoding="utf-8")
            record = {"template": str(t)}
            try:
                record["literals"] = sorted(set(_get_template_literal_text(source).split("\0")))
            except Exception as e:  # noqa: BLE001  Jinja2 refuses some templates; recorded as such
                record["error"] = f"{type(e).__name__}: {e}"
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(templates)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/chatmask-sanitize-expect"))
    ap.add_argument("--limit", type=int, default=20)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    ref = oracle()
    dirs = [TOKENIZERS_DIR / name for name in fixture_tokenizers()] + synthetic_tokenizers(args.out)
    counts = {"rows": 0, "errors": 0, "ids": 0, "templates": write_literals(args.out / "literals.jsonl")}
    with (
        open(args.out / "expect.jsonl", "w", encoding="utf-8") as sink,
        open(args.out / "control_tokens.jsonl", "w", encoding="utf-8") as controls,
    ):
        for tok_dir in dirs:
            tok = ref.load_tokenizer(str(tok_dir))
            template = tok.get_chat_template()
            controls.write(
                json.dumps(
                    {
                        "tokenizer_dir": str(tok_dir),
                        "template": template,
                        "control_tokens": list(tok._get_control_tokens(template)),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
            for file_idx, path in enumerate(conversation_files()):
                for row_idx, row in enumerate(ref.read_conversations(path)):
                    if row_idx >= args.limit:
                        break
                    template = tok.get_chat_template(None, row.get("tools") or None)
                    messages, tools, kwargs = injected_row(row, row_idx, file_idx, probes(tok, template))
                    record = {
                        "tokenizer": tok_dir.name,
                        "tokenizer_dir": str(tok_dir),
                        "file": path.name,
                        "row": row_idx,
                        "kwargs": kwargs,
                        "tools": tools,
                        "messages": messages,
                    }
                    try:
                        ids = tok.apply_chat_template(
                            messages,
                            tools=tools,
                            tokenize=True,
                            sanitize_control_tokens=True,
                            return_dict=False,
                            **kwargs,
                        )
                        record["expected_ids"] = list(ids)
                        counts["ids"] += len(ids)
                    except Exception as e:  # noqa: BLE001  the exception is the expectation
                        record["expected_error"] = {"type": type(e).__name__, "message": str(e)}
                        counts["errors"] += 1
                    counts["rows"] += 1
                    sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            print(f"{tok_dir.name}: done", file=sys.stderr)
    print(json.dumps({"out": str(args.out / "expect.jsonl"), **counts}))


if __name__ == "__main__":
    main()
