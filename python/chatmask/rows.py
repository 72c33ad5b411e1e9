"""The one way a stored row becomes a conversation, for ``chatmask tokenize``, ``chatmask show``
and the `datasets` / Ray Data adapters.

A row arrives as a JSONL line (bytes) or as a mapping of column values (a Parquet row, a batch
row of an adapter). It must be an object whose messages field is a list; a ``tools`` string is
parsed as JSON (Parquet cannot hold free-form JSON schemas, so datasets store them as text);
anything else is a reason, never an exception.

**The null rule** (the only place nulls are removed):

1. A JSONL line is JSON: its nulls are real and kept.
2. A value whose Arrow type is known (the CLI's Parquet reader, `datasets`, Ray Data): struct
   fields lose their null-valued keys, because Arrow gives every struct of a column every field
   (a user turn gets ``tool_calls: None``); values typed as JSON (``arrow.json``, `datasets`'
   ``Json`` feature) keep theirs (:func:`value_reader`).
3. A mapping of unknown provenance (plain Python dicts handed to an adapter): the dicts inside
   the messages and a list-valued tools field lose their null-valued keys, as if they were
   Arrow structs.
4. In every case a tools field given as a JSON **string** is parsed last and keeps its nulls:
   ``"default": null`` in a tool schema is JSON text, not an Arrow artefact.

So a conversation tokenizes the same from Parquet as from the JSONL it came from, and the CLI,
the adapters and ``show`` agree on every row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .policy import MaskPolicy

__all__ = [
    "PREFERENCE_FIELDS",
    "CoreRow",
    "ParsedRow",
    "Fields",
    "parse_row",
    "parse_policy_row",
    "parse_preference_row",
    "preference_columns",
    "strip_nulls",
    "type_name",
    "value_reader",
]


@dataclass
class ParsedRow:
    """A row ready for `tokenize_batch`, or the reason it cannot be tokenized."""

    conversation: Any  # a dict ({"messages", "tools"?}), a CoreRow (parse_lines), or None: see `error`
    finish_reason: str | None = None
    id: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Fields:
    """The columns a row is read from: a policy's ``field_*`` or the mode options'."""

    messages: str = "messages"
    tools: str = "tools"
    finish_reason: str | None = None
    system: str | None = None  # a policy's field_system

    @classmethod
    def of_policy(cls, policy: MaskPolicy) -> Fields:
        return cls(policy.field_messages, policy.field_tools, None, policy.field_system)

    def columns(self) -> list[str]:
        """The columns to read (Parquet reads only these), ``id`` included."""
        extra = [c for c in (self.finish_reason, self.system) if c]
        return list(dict.fromkeys([self.messages, self.tools, "id", *extra]))


def type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def strip_nulls(value: Any) -> Any:
    """Drop null-valued keys from dicts, recursively (rule 3: values treated as Arrow structs)."""
    if isinstance(value, dict):
        return {k: strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_nulls(v) for v in value]
    return value


_strip = strip_nulls  # for the functions whose `strip_nulls` argument hides the name


def _is_list(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _is_json(arrow_type: Any) -> bool:
    return getattr(arrow_type, "extension_name", None) == "arrow.json"


def value_reader(arrow_type: Any, decode_json: bool) -> Callable[[Any], Any] | None:
    """Rule 2: a function that turns a value of `arrow_type` (as Python) into plain conversation
    data, or None when the value is fine as it is.

    Struct fields lose their null-valued keys; JSON-typed values keep theirs, and with
    `decode_json` their text is parsed (pyarrow hands them over as strings, while `datasets` has
    already decoded them).
    """
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        fields = {
            arrow_type.field(i).name: value_reader(arrow_type.field(i).type, decode_json)
            for i in range(arrow_type.num_fields)
        }

        def read_struct(value: Any) -> Any:
            if not isinstance(value, dict):
                return value
            out = {}
            for key, item in value.items():
                if item is not None:
                    inner = fields.get(key)
                    out[key] = item if inner is None else inner(item)
            return out

        return read_struct
    if _is_list(arrow_type):
        element = value_reader(arrow_type.value_type, decode_json)
        if element is None:
            return None

        def read_list(value: Any) -> Any:
            if not isinstance(value, list):
                return value
            return [None if item is None else element(item) for item in value]

        return read_list
    if decode_json and _is_json(arrow_type):

        def read_json(value: Any) -> Any:
            return json.loads(value) if isinstance(value, (str, bytes)) else value

        return read_json
    return None


def read_column(values: Sequence[Any], arrow_type: Any, decode_json: bool) -> Sequence[Any]:
    """Rule 2 over a column of values of one Arrow type."""
    read = None if arrow_type is None else value_reader(arrow_type, decode_json)
    if read is None:
        return values
    return [None if v is None else read(v) for v in values]


def _load_payload(payload: bytes | bytearray | Mapping[str, Any] | list[Any]) -> tuple[Any, bool, str | None]:
    """(the row's value, whether it came as columns rather than JSON text, or the reason it cannot be read)."""
    if isinstance(payload, (bytes, bytearray)):
        if not payload.strip():
            return None, False, "empty line"
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, False, f"invalid UTF-8: {e}"
        try:
            obj = json.loads(text, strict=False)  # raw control characters (\r, tabs) inside strings are kept
        except (ValueError, RecursionError) as e:
            return None, False, f"invalid JSON: {e}"
        return obj, False, None
    return payload, not isinstance(payload, list), None


def _open(payload: Any, strip_nulls: bool | None, *, lists: bool) -> tuple[Any, bool, str | None]:
    """(the row's value, whether its nulls go (rules 1-3; `strip_nulls` overrides), or the reason
    it cannot be read): an object, or with `lists` a list of messages too."""
    obj, columns, error = _load_payload(payload)
    strip = columns if strip_nulls is None else strip_nulls
    if error is None and not isinstance(obj, Mapping) and not (lists and isinstance(obj, list)):
        error = f"row is a JSON {type_name(obj)}, not an object" + (" or a list of messages" if lists else "")
    return obj, strip, error


def _add_tools_and_system(
    row: dict[str, Any], obj: Mapping[str, Any], tools_field: str, tools: Any, system_field: str | None
) -> None:
    """The parsed tools (if any) and the system field (if set and not null) into `row`."""
    if tools is not None:
        row[tools_field] = tools
    if system_field is not None and obj.get(system_field) is not None:
        row[system_field] = obj[system_field]


def _row_id(obj: Mapping[str, Any]) -> str | None:
    raw_id = obj.get("id")
    return None if raw_id is None else raw_id if isinstance(raw_id, str) else json.dumps(raw_id)


def _messages_and_tools(obj: Mapping[str, Any], fields: Fields, strip: bool) -> tuple[Any, Any, str | None]:
    """A row's messages (a list) and tools (a list, a JSON string parsed, or None), or an error."""
    if fields.messages not in obj:
        return None, None, f"missing field {fields.messages!r}"
    messages = obj[fields.messages]
    if not isinstance(messages, list):
        return None, None, f"field {fields.messages!r} is a {type_name(messages)}, not a list of messages"
    if strip:  # rule 3, before a tools string is parsed (rule 4)
        messages = strip_nulls(messages)
    tools, error = _tools(obj, fields.tools, strip)
    return (None, None, error) if error is not None else (messages, tools, None)


def _tools(obj: Mapping[str, Any], name: str, strip: bool) -> tuple[Any, str | None]:
    """A row's tools field: a list, a JSON string parsed (rule 4), or None; or an error."""
    tools = obj.get(name)
    if strip:
        tools = strip_nulls(tools)
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError as e:
            return None, f"field {name!r} is a string but not JSON: {e}"
    if tools is not None and not isinstance(tools, list):
        return None, f"field {name!r} is a {type_name(tools)}, not a list"
    return tools, None


def parse_row(
    payload: bytes | Mapping[str, Any],
    messages_field: str = "messages",
    tools_field: str = "tools",
    finish_reason_field: str | None = None,
    *,
    strip_nulls: bool | None = None,
) -> ParsedRow:
    """One row to ``{"messages", "tools"?}`` for ``tokenize_batch(mode=...)``; a failure is a message.

    `strip_nulls` None applies the null rule by the payload's kind (JSON text: keep, rule 1; a
    mapping of unknown provenance: strip, rule 3); pass False for values already read by their
    Arrow types (rule 2).
    """
    fields = Fields(messages_field, tools_field, finish_reason_field)
    obj, strip, error = _open(payload, strip_nulls, lists=False)
    if error is not None:
        return ParsedRow(None, error=error)
    row_id = _row_id(obj)
    messages, tools, error = _messages_and_tools(obj, fields, strip)
    if error is not None:
        return ParsedRow(None, id=row_id, error=error)
    finish = None
    if finish_reason_field is not None:
        finish = obj.get(finish_reason_field)
        if finish is not None and not isinstance(finish, str):
            return ParsedRow(
                None, id=row_id, error=f"field {finish_reason_field!r} is a {type_name(finish)}, not a string"
            )
    conversation: dict[str, Any] = {"messages": messages}
    if tools is not None:
        conversation["tools"] = tools
    return ParsedRow(conversation, finish, row_id)


def parse_policy_row(
    payload: bytes | Mapping[str, Any] | list[Any], policy: MaskPolicy, *, strip_nulls: bool | None = None
) -> ParsedRow:
    """One row for ``tokenize_batch(policy=...)``: the row keyed by the policy's own fields.

    The conversation is ``{field_messages: [...], field_tools: [...] (if any), field_system: ...
    (if set and present)}``, the messages as they are in the row (the policy maps roles and
    properties when it tokenizes), or the row itself when it is a list (a JSONL line holding a
    JSON array of messages). Checks and null rule as in :func:`parse_row`.
    """
    fields = Fields.of_policy(policy)
    obj, strip, error = _open(payload, strip_nulls, lists=True)
    if error is not None:
        return ParsedRow(None, error=error)
    if isinstance(obj, list):
        return ParsedRow({fields.messages: _strip(obj) if strip else obj})
    row_id = _row_id(obj)
    messages, tools, error = _messages_and_tools(obj, fields, strip)
    if error is not None:
        return ParsedRow(None, id=row_id, error=error)
    conversation: dict[str, Any] = {fields.messages: messages}
    _add_tools_and_system(conversation, obj, fields.tools, tools, fields.system)
    return ParsedRow(conversation, None, row_id)


#: The fields of a preference row (``chatmask tokenize --task preference``, :mod:`chatmask.preference`).
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def preference_columns(policy: MaskPolicy) -> list[str]:
    """The input columns a preference row is read from (Parquet reads only these), ``id`` last."""
    extra = [c for c in (policy.field_tools, policy.field_system) if c]
    return list(dict.fromkeys([*PREFERENCE_FIELDS, *extra, "id"]))


def parse_preference_row(payload: Any, policy: MaskPolicy, *, strip_nulls: bool | None = None) -> ParsedRow:
    """One preference row for ``tokenize_preference_batch``: its ``prompt`` / ``chosen`` /
    ``rejected`` as they are, the policy's tools and system fields; the null rule as in
    :func:`parse_row`. The shapes are checked by the preference reader (a reason, per row)."""
    obj, strip, error = _open(payload, strip_nulls, lists=False)
    if error is not None:
        return ParsedRow(None, error=error)
    row_id = _row_id(obj)
    # Absent and null are the same here: a Parquet column has every key (implicit rows: prompt null).
    row = {k: _strip(obj[k]) if strip else obj[k] for k in PREFERENCE_FIELDS if obj.get(k) is not None}
    tools, error = _tools(obj, policy.field_tools, strip)
    if error is not None:
        return ParsedRow(None, id=row_id, error=error)
    _add_tools_and_system(row, obj, policy.field_tools, tools, policy.field_system)
    return ParsedRow(row, None, row_id)


def parse(payload: Any, fields: Fields, policy: MaskPolicy | None, *, strip_nulls: bool | None = None) -> ParsedRow:
    """:func:`parse_policy_row` under a policy, else :func:`parse_row` with `fields`."""
    if policy is not None:
        return parse_policy_row(payload, policy, strip_nulls=strip_nulls)
    return parse_row(payload, fields.messages, fields.tools, fields.finish_reason, strip_nulls=strip_nulls)


class CoreRow:
    """A JSONL row the core read (:func:`parse_lines`): `core` is the row as template values, which
    `tokenize_batch` takes without converting anything; :meth:`python` reads the same line the
    Python way, for the few places that need Python objects (routing a template, the Jinja2 path,
    a policy with ``split_thinking``)."""

    __slots__ = ("core", "payload", "fields", "policy")

    def __init__(self, core: Any, payload: bytes, fields: Fields, policy: MaskPolicy | None) -> None:
        self.core, self.payload, self.fields, self.policy = core, payload, fields, policy

    def python(self) -> Any:
        return parse(self.payload, self.fields, self.policy).conversation


def python_row(row: Any) -> Any:
    """`row` as Python objects (a :class:`CoreRow` read the Python way)."""
    return row.python() if isinstance(row, CoreRow) else row


def core_rows(rows: Sequence[Any]) -> list[Any]:
    """`rows` as the core takes them (a :class:`CoreRow` as its core row)."""
    return [row.core if isinstance(row, CoreRow) else row for row in rows]


def parse_lines(payloads: Sequence[bytes], fields: Fields, policy: MaskPolicy | None) -> list[ParsedRow]:
    """JSONL lines (rule 1) as :func:`parse` reads them, read by the core where it can be exact
    (serde_json, in parallel, no Python objects) and by :func:`parse` where it cannot: invalid
    lines, rows with an error to word, numbers serde_json reads otherwise."""
    from . import _core

    if policy is not None:
        core_rows = _core.parse_jsonl(list(payloads), fields.messages, fields.tools, None, fields.system, policy=True)
    else:
        core_rows = _core.parse_jsonl(list(payloads), fields.messages, fields.tools, fields.finish_reason)
    out = []
    for payload, core in zip(payloads, core_rows):
        if core is None:
            out.append(parse(payload, fields, policy))
        else:
            out.append(ParsedRow(CoreRow(core, payload, fields, policy), core.finish_reason, core.id))
    return out
