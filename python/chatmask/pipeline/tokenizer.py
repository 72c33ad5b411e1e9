"""The tokenizer of a job and its fingerprint: everything about it that changes the output.

``--resume`` compares the fingerprint of the interrupted run with the new one. It covers the
bytes of **every file the loader reads** (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``, ``chat_template.jinja``, ``additional_chat_templates/*.jinja``:
the list in ``chatmask._tokenizer``, which the pickle uses too), or the parts of a tokenizer built
from parts (the demo), the template the default render uses and the path it takes (minijinja or
the Jinja2 fallback). The job adds the mode, policy, fields and chatmask version
(:func:`chatmask.pipeline.state.job_config`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

from .._tokenizer import ChatTokenizer, EncoderChoice
from .._usage import UsageError
from ..errors import ChatMaskError


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode("utf-8") if isinstance(data, str) else data).hexdigest()


@dataclass
class LoadedTokenizer:
    """A tokenizer plus what the manifest and ``--resume`` record about it."""

    tok: ChatTokenizer
    name: str
    sha256: str  # of tokenizer.json (the manifest's tokenizer_sha256)
    fingerprint: dict[str, Any] = field(default_factory=dict)


def fingerprint(tok: ChatTokenizer) -> dict[str, Any]:
    """What of `tok` decides its output: the sha256 of each input it was built from, the
    template chosen and its render path."""
    recipe = tok._recipe
    if recipe is None:  # pragma: no cover - load_tokenizer only builds tokenizers with a recipe
        raise UsageError("the tokenizer has no recorded inputs; cannot fingerprint it for --resume")
    if recipe[0] == "files":
        files = {name: _sha256(data) for name, data in recipe[1]}
    else:
        _, tokenizer_json, template, specials, _ = recipe
        files = {
            "tokenizer.json": _sha256(tokenizer_json),
            "chat_template": _sha256(repr(sorted(template.items())) if isinstance(template, dict) else repr(template)),
            "special_tokens": _sha256(repr(sorted(specials.items()))),
        }
    try:
        template_sha = _sha256(tok._core.template_source())
    except ChatMaskError:
        template_sha = None  # no template: every row fails, the same way each run
    return {
        "files": files,
        "template_sha256": template_sha,
        "render_backend": tok.render_backend,
        # The engine gives the same ids by construction, but a run is only resumed as it began.
        "encoder": tok.encoder_backend,
    }


def load_tokenizer(spec: str, encoder: EncoderChoice = "auto", allow_jinja2: bool = False) -> LoadedTokenizer:
    """``demo`` or a local tokenizer directory; never a download (a hub id is a usage error)."""
    if spec == "demo":
        from ..demo import demo_tokenizer, demo_tokenizer_json

        tok = demo_tokenizer(encoder=encoder)
        return LoadedTokenizer(tok, "demo", _sha256(demo_tokenizer_json()), fingerprint(tok))
    if not os.path.isdir(spec):
        raise UsageError(
            f"--tokenizer {spec!r} is not a local directory, and chatmask does not download tokenizers: "
            "pass a directory holding tokenizer.json and tokenizer_config.json "
            "(e.g. from `huggingface-cli download`), or `demo`"
        )
    try:
        tok = ChatTokenizer.from_pretrained(spec, allow_jinja2=allow_jinja2, encoder=encoder)
    except ChatMaskError as e:
        raise UsageError(f"cannot load tokenizer from {spec!r}: {e}") from e
    files = dict(tok._recipe[1]) if tok._recipe is not None else {}
    return LoadedTokenizer(tok, spec, _sha256(files.get("tokenizer.json", b"")), fingerprint(tok))
