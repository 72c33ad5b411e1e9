"""What routing a template's operators through function calls costs a render: the price of the
run-time proof sketched in docs/truth.md ("The way to 15%").

A template that uses `|safe` has every `a + b` and `a ~ b` rewritten into a call
(`src/template/rewrite.rs`), so the same template with a dead `{{ ''|safe }}` appended renders
the same text with those operators as calls. Times `apply_chat_template(..., tokenize=False)`
over every fixture conversation, both ways, least CPU time of `--repeat` rounds.

    python benches/call_cost.py [--tokenizers qwen3,llama3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _reference_vs_spans as rvs  # noqa: E402
from _differential import native_core  # noqa: E402
from _parity import SHARED, oracle  # noqa: E402
from _timing import best_cpu  # noqa: E402
from reference_flags import rows_of  # noqa: E402

AS_CALLS = "{% if false %}{{ ''|safe }}{% endif %}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizers", default="qwen3,llama3,mistral-nemo")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    date = {"date_string": oracle().DATE_STRING}
    rows = [row for path in rvs.conversation_paths() for row in rows_of(path, None)]
    for name in args.tokenizers.split(","):
        tok = native_core(name)
        config = json.loads((SHARED / "fixtures" / "tokenizers" / name / "tokenizer_config.json").read_text())
        source = config["chat_template"]

        def render_all(template: str, tok=tok) -> None:
            for row in rows:
                try:
                    tok.apply_chat_template(
                        row["messages"], tools=row.get("tools"), tokenize=False, chat_template=template, **date
                    )
                except Exception:  # rows the template refuses: refused alike both ways
                    pass

        texts = [
            tok.apply_chat_template(rows[0]["messages"], tokenize=False, chat_template=t, **date)
            for t in (source, source + AS_CALLS)
        ]
        assert texts[0] == texts[1], "the rewrite changed the render"
        plain = best_cpu(lambda: render_all(source), args.repeat)
        calls = best_cpu(lambda: render_all(source + AS_CALLS), args.repeat)
        operators = source.count(" + ") + source.count(" ~ ")
        print(
            f"{name:14} ~{operators} '+'/'~' in the source: {plain:.3f}s plain, {calls:.3f}s as calls, x{calls / plain:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
