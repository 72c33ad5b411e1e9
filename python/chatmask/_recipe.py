"""What a `ChatTokenizer` is built from, so it can be built again in another process: the bytes
of the files a directory load reads, or the parts (see `ChatTokenizer.__reduce__`)."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from . import _core

if TYPE_CHECKING:
    from ._tokenizer import ChatTokenizer


# The files `_core.ChatTokenizer.from_pretrained` reads (src/core/mod.rs, `from_dir`), relative to the directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_EXTRA_TEMPLATES = "additional_chat_templates"


def read_tokenizer_files(path: str) -> tuple[tuple[str, bytes], ...]:
    """The bytes of every file a tokenizer directory load reads, by relative path (sorted)."""
    files = []
    for name in TOKENIZER_FILES:
        full = os.path.join(path, name)
        if os.path.isfile(full):
            with open(full, "rb") as f:
                files.append((name, f.read()))
    extra = os.path.join(path, _EXTRA_TEMPLATES)
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            full = os.path.join(extra, name)
            if name.endswith(".jinja") and os.path.isfile(full):
                with open(full, "rb") as f:
                    files.append((f"{_EXTRA_TEMPLATES}/{name}", f.read()))
    return tuple(files)


def restore(
    cls: type[ChatTokenizer],
    recipe: tuple[Any, ...],
    verify: int,
    fallback: Sequence[str],
    limits: tuple[Any, ...],
    allow_jinja2: bool = False,
) -> ChatTokenizer:
    """Unpickle a `ChatTokenizer` (see `ChatTokenizer.__reduce__`)."""
    import tempfile

    # The process that pickled it has already warned about templates on the Jinja2 path.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if recipe[0] == "files":
            _, files, encoder = recipe
            with tempfile.TemporaryDirectory(prefix="chatmask-tokenizer-") as tmp:
                for name, data in files:
                    target = os.path.join(tmp, *name.split("/"))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with open(target, "wb") as f:
                        f.write(data)
                tok = cls(_core.ChatTokenizer.from_pretrained(tmp, encoder), verify, allow_jinja2)
        elif recipe[0] == "parts":
            _, tokenizer_json, template, specials, encoder = recipe
            tok = cls(
                _core.ChatTokenizer.from_parts(tokenizer_json, template, dict(specials), encoder), verify, allow_jinja2
            )
        else:  # pragma: no cover - only pickles of this module's own making reach here
            raise ValueError(f"unknown ChatTokenizer pickle recipe {recipe[0]!r}")
        tok._recipe = recipe
        for source in fallback:
            if source not in tok._fallback:
                tok._renderer_for(source, "it took the Jinja2 path in the process that pickled this tokenizer")
    tok._core.set_render_limits(*limits)
    return tok
