"""Type stub for the compiled core (`src/python/`). The public, documented API is the
`chatmask` package; this module is its engine and may change between versions."""

from os import PathLike
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

__version__: str
DEMO_CONVERSATIONS_JSON: str
DEMO_CHAT_TEMPLATE: str
DEMO_EOS_TOKEN: str
DEFAULT_RENDER_LIMITS: tuple[int | None, int, int | None]

def peak_render_fuel(reset: bool = False) -> int: ...

Conversation = Sequence[Mapping[str, Any]]

def demo_tokenizer_json(kind: str = "bytelevel") -> str: ...
def default_threads() -> int: ...
def unicode_known_text() -> str: ...
def install_unicode_tables(tables: Mapping[str, Any]) -> None: ...
def pack_plan(
    offsets: npt.NDArray[np.int64],
    label_offsets: npt.NDArray[np.int64],
    rows: npt.NDArray[np.int64],
    max_length: int,
    strategy: str,
    overflow: str,
) -> dict[str, npt.NDArray[np.int64]]: ...
def pack_gather(
    src: npt.NDArray[Any],
    piece_start: npt.NDArray[np.int64],
    piece_len: npt.NDArray[np.int64],
    pack_offsets: npt.NDArray[np.int64],
    max_length: int,
    pad: int | None = None,
    first: int | None = None,
) -> npt.NDArray[Any]: ...
def pack_positions(
    piece_len: npt.NDArray[np.int64],
    pack_offsets: npt.NDArray[np.int64],
    max_length: int,
    pad: bool,
) -> npt.NDArray[np.int64]: ...

class JsonRow:
    """A JSONL row the core read (`parse_jsonl`); `tokenize_batch` takes it as it is."""

    @property
    def id(self) -> str | None: ...
    @property
    def finish_reason(self) -> str | None: ...
    def assistant_messages(self) -> list[bool]: ...
    def values_json(self, shape: Mapping[str, Any] | None = None) -> str | None: ...

def parse_jsonl(
    lines: Sequence[bytes],
    messages_field: str,
    tools_field: str,
    finish_reason_field: str | None = None,
    system_field: str | None = None,
    policy: bool = False,
) -> list[JsonRow | None]: ...

class ChatTokenizer:
    @staticmethod
    def from_pretrained(path: str | PathLike[str], encoder: str = "auto") -> ChatTokenizer: ...
    @staticmethod
    def from_parts(
        tokenizer_json: str,
        chat_template: str | Mapping[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        encoder: str = "auto",
    ) -> ChatTokenizer: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def encoder_backend(self) -> str: ...
    @property
    def encoder_fallback(self) -> tuple[str, bool] | None: ...
    @property
    def encoder_check_seconds(self) -> tuple[float, float]: ...
    def reference_encode(self, text: str) -> list[int]: ...
    @property
    def special_tokens(self) -> dict[str, str]: ...
    @property
    def has_chat_template(self) -> bool: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], per_token: bool = False) -> str | list[str]: ...
    def template_source(self, chat_template: str | None = None, has_tools: bool = False) -> str: ...
    def template_sources(self) -> list[str]: ...
    def render_limits(self) -> tuple[int | None, int, int | None]: ...
    def set_render_limits(self, fuel: int | None, max_recursion: int, max_output_bytes: int | None) -> None: ...
    def compile_error(self, chat_template: str | None = None, has_tools: bool = False) -> Exception | None: ...
    def render(
        self,
        conversation: Conversation,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str: ...
    def render_with_spans(
        self,
        conversation: Conversation,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> tuple[str, list[tuple[int, int]]]: ...
    def assistant_mask(
        self,
        conversation: Conversation,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> tuple[list[int], list[int]]: ...
    def mask_from_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]: ...
    def label(
        self,
        conversation: Conversation,
        mode: str = "last",
        finish_reason: str = "",
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> tuple[list[int], list[int]]: ...
    def label_with(
        self,
        conversation: Conversation,
        render: Callable[[int, bool], str],
        mode: str = "last",
        finish_reason: str = "",
    ) -> tuple[list[int], list[int]]: ...
    def tokenize_batch(
        self,
        conversations: Sequence[Conversation | Mapping[str, Any]],
        mode: str = "last",
        finish_reason: str | Sequence[str | None] | None = None,
        num_threads: int | None = None,
        on_error: str = "raise",
        ids_dtype: str = "int32",
        chat_template: str | None = None,
        policy: Mapping[str, Any] | None = None,
        shape: Mapping[str, Any] | None = None,
        judge: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]: ...
    def tokenize_rollout_batch(
        self,
        rows: Iterable[Any],
        policy: Mapping[str, Any],
        bridge: bool = False,
        num_threads: int | None = None,
        on_error: str = "raise",
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]: ...
    def policy_view(self, policy: Mapping[str, Any]) -> dict[str, Any]: ...
    def tokenize(
        self,
        conversation: Conversation,
        policy: Mapping[str, Any],
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | None: ...
    def message_spans(
        self,
        conversation: Conversation,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> tuple[str, list[tuple[int, str, int, int]], str]: ...
    def positions(self, text: str) -> tuple[list[int], list[tuple[int, int]], bool, list[tuple[int, int]]]: ...
    def encode_sanitized(
        self,
        conversation: Conversation,
        add_generation_prompt: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> list[int]: ...
    def control_tokens(self, chat_template: str | None = None, has_tools: bool = False) -> list[str]: ...
