"""The harmony chat format: rendering conversations to prompt tokens, tools from Python functions, and a
tolerant parser for what the model generates.

gpt-oss only works in harmony. A prompt is a system message (with `Reasoning: low|medium|high`), an optional
developer message (instructions, function tools, response formats), the conversation, and finally
`<|start|>assistant`. The model answers with messages of its own, each
`<|channel|>NAME[ to=RECIPIENT][ <|constrain|>TYPE]<|message|>TEXT<|end|>`, separated by `<|start|>assistant`,
and ends its turn with `<|return|>` (final answer) or `<|call|>` (tool call).

Rendering goes through openai-harmony. Parsing does not: harmony's StreamableParser raises on malformed output
(a random or small model produces plenty), so `HarmonyStreamParser` is our own small state machine that never
raises, labels every token with its channel as it arrives, and records what was wrong. On well-formed output it
agrees with openai-harmony's parser (tests check this).

All token ids in this module are o200k_harmony ids; `ossscope.tokenizer.Tokenizer` maps them to model ids.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import re
import types
import typing
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ossscope import encode, toolcall
from ossscope import tokenizer as tk

REASONING_EFFORTS = ("low", "medium", "high")
BUILTIN_NAMESPACES = ("browser", "python")  # harmony's built-in tools: addressed by namespace, not functions.X
CHANNELS = ("analysis", "commentary", "final")
_CLOSERS = {tk.END: "<|end|>", tk.RETURN: "<|return|>", tk.CALL: "<|call|>"}


# -- tools from Python functions --------------------------------------------------------------------------


def _docstring_parts(fn: Callable) -> tuple[str, dict[str, str]]:
    """Split a docstring into the description and per-parameter descriptions.

    Understands Google style (`Args:` then `name (type): text` lines) and Sphinx style (`:param name: text`).
    """
    doc = inspect.getdoc(fn) or ""
    params: dict[str, str] = {}
    description_lines: list[str] = []
    section = None
    current = None
    for line in doc.splitlines():
        stripped = line.strip()
        sphinx = re.match(r":param\s+(?:[^:]*\s)?(\w+):\s*(.*)", stripped)
        if sphinx:
            params[sphinx.group(1)] = sphinx.group(2).strip()
            current, section = sphinx.group(1), "sphinx"
            continue
        if re.fullmatch(r"(Args|Arguments|Parameters|Params)\s*:", stripped):
            section, current = "args", None
            continue
        if re.fullmatch(r"(Returns?|Raises|Yields|Examples?|Notes?)\s*:", stripped) or stripped.startswith(":"):
            section, current = "other", None
            continue
        if section == "args":
            entry = re.match(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if entry and line.startswith((" ", "\t")) and not line.startswith(("        ", "\t\t")):
                current = entry.group(1)
                params[current] = entry.group(2).strip()
            elif current and stripped:
                params[current] = (params[current] + " " + stripped).strip()
            continue
        if section == "sphinx" and current and stripped and line.startswith((" ", "\t")):
            params[current] = (params[current] + " " + stripped).strip()
            continue
        if section is None:
            description_lines.append(line)
    description = "\n".join(description_lines).strip()
    return description, params


def json_schema_for_type(tp: Any) -> dict[str, Any]:
    """JSON schema of a Python type hint (str, int, float, bool, list[X], dict[str, X], Literal, Enum,
    Optional/Union, TypedDict, dataclass, Annotated[X, "description"]). Unknown types give {} (any)."""
    if tp is inspect.Parameter.empty or tp is Any:
        return {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        schema = json_schema_for_type(args[0])
        notes = [a for a in args[1:] if isinstance(a, str)]
        if notes:
            schema["description"] = " ".join(notes)
        return schema
    if tp is type(None):
        return {"type": "null"}
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if origin is typing.Literal:
        schema = {"enum": list(args)}
        kinds = {type(a) for a in args}
        if len(kinds) == 1:
            schema.update(json_schema_for_type(kinds.pop()))
        return schema
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [member.value for member in tp]
        schema = {"enum": values}
        kinds = {type(v) for v in values}
        if len(kinds) == 1:
            schema.update(json_schema_for_type(kinds.pop()))
        return schema
    if origin in (typing.Union, types.UnionType):
        # Optional[X] is X for the schema: leaving the parameter out (its default) is how "none" is said.
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return json_schema_for_type(options[0])
        return {"anyOf": [json_schema_for_type(a) for a in options]}
    if tp in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset, Sequence, Iterable):
        schema: dict[str, Any] = {"type": "array"}
        if args:  # list[X], tuple[X, ...]: the first argument is the item type
            schema["items"] = json_schema_for_type(args[0])
        return schema
    if tp is dict or origin is dict:
        schema = {"type": "object"}
        if len(args) == 2:
            schema["additionalProperties"] = json_schema_for_type(args[1])
        return schema
    if isinstance(tp, type) and (typing.is_typeddict(tp) or dataclasses.is_dataclass(tp)):
        hints = typing.get_type_hints(tp, include_extras=True)
        if dataclasses.is_dataclass(tp):
            required = [
                f.name
                for f in dataclasses.fields(tp)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            ]
        else:
            required = sorted(getattr(tp, "__required_keys__", hints))
        return {
            "type": "object",
            "properties": {name: json_schema_for_type(hint) for name, hint in hints.items()},
            "required": [name for name in hints if name in required],
        }
    return {}


def function_schema(fn: Callable) -> dict[str, Any]:
    """JSON schema of a function's parameters, from its signature, type hints and docstring.

    Parameters without a default are required; defaults that JSON can hold are given as `default`.
    """
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except (NameError, TypeError):  # unresolvable forward references: no types rather than fail
        hints = {}
    _, docs = _docstring_parts(fn)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name in ("self", "cls"):
            continue
        schema = json_schema_for_type(hints.get(name, param.annotation))
        if name in docs and "description" not in schema:
            schema["description"] = docs[name]
        if param.default is param.empty:
            required.append(name)
        else:
            default = param.default.value if isinstance(param.default, enum.Enum) else param.default
            if default is not None and _is_json_value(default):
                schema["default"] = default
        properties[name] = schema
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def _is_json_value(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


@dataclasses.dataclass
class Tool:
    """A function tool: its name, description and JSON schema, and the Python callable behind it (if any).

    timeout_s: how long a call may run before the model is told it timed out (None: toolcall.DEFAULT_TIMEOUT_S,
    60 s; math.inf: no limit). The callable may be a coroutine function; it is awaited.
    """

    name: str
    description: str
    parameters: dict[str, Any] | None
    fn: Callable | None = None
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        self.timeout_s = toolcall.check_timeout(self.timeout_s)

    @classmethod
    def from_function(cls, fn: Callable, name: str | None = None, timeout_s: float | None = None) -> Tool:
        """A tool from a Python callable: name from `__name__`, description from the docstring."""
        description, _ = _docstring_parts(fn)
        tool_name = name or getattr(fn, "__name__", None)
        if not tool_name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tool_name):
            raise ValueError(f"tool name {tool_name!r} is not a valid identifier; pass name=...")
        return cls(tool_name, description, function_schema(fn), fn, timeout_s)

    def to_harmony(self) -> Any:
        from openai_harmony import ToolDescription

        return ToolDescription.new(self.name, self.description, self.parameters)


def as_tools(tools: Iterable[Any] | None) -> list[Tool]:
    """Normalize tools: Python callables, `Tool`s, harmony ToolDescriptions or dicts {name, description,
    parameters[, fn, timeout_s]}. Raises ValueError on duplicates."""
    out: list[Tool] = []
    for item in tools or ():
        if isinstance(item, Tool):
            out.append(item)
        elif isinstance(item, dict):
            out.append(Tool(item["name"], item.get("description", ""), item.get("parameters"), item.get("fn"),
                            item.get("timeout_s")))
        elif hasattr(item, "name") and hasattr(item, "description") and not callable(item):
            out.append(Tool(item.name, item.description, getattr(item, "parameters", None)))
        elif callable(item):
            out.append(Tool.from_function(item))
        else:
            raise TypeError(f"cannot make a tool out of {item!r}: pass a function, a Tool or a dict")
    names = [t.name for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two tools share the name(s) {duplicates}")
    return out


def check_arguments(schema: dict[str, Any] | None, args: Any) -> list[str]:
    """What is wrong with a tool call's (parsed JSON) arguments against its schema; [] when nothing.

    Checks the object shape, required and unknown names, and the basic JSON types and enums of each value.
    """
    if schema is None:
        return [] if args in ({}, None) else ["this tool takes no arguments"]
    if not isinstance(args, dict):
        return [f"arguments must be a JSON object, got {type(args).__name__}"]
    problems = []
    properties = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in args:
            problems.append(f"missing required argument {name!r}")
    for name, value in args.items():
        if name not in properties:
            if schema.get("additionalProperties", True) is False or properties:
                problems.append(f"unknown argument {name!r} (expected one of {sorted(properties)})")
            continue
        problems += [f"argument {name!r}: {p}" for p in _check_value(properties[name], value)]
    return problems


def _check_value(schema: dict[str, Any], value: Any) -> list[str]:
    if "enum" in schema and value not in schema["enum"]:
        return [f"{value!r} is not one of {schema['enum']}"]
    if "anyOf" in schema:
        return [] if any(not _check_value(s, value) for s in schema["anyOf"]) else [f"{value!r} matches no option"]
    kind = schema.get("type")
    if isinstance(kind, list):  # {"type": ["number", "string"]}: any of them
        return [] if any(not _check_value({"type": k}, value) for k in kind) else [
            f"expected {' or '.join(kind)}, got {json.dumps(value)}"
        ]
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
        "null": lambda v: v is None,
    }
    if kind in checks and not checks[kind](value):
        return [f"expected {kind}, got {json.dumps(value)}"]
    if kind == "array" and "items" in schema:
        return [p for item in value for p in _check_value(schema["items"], item)]
    return []


# -- rendering ----------------------------------------------------------------------------------------------


def _effort(reasoning: str) -> Any:
    from openai_harmony import ReasoningEffort

    value = str(reasoning).lower()
    if value not in REASONING_EFFORTS:
        raise ValueError(f"reasoning must be one of {REASONING_EFFORTS}, got {reasoning!r}")
    return {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}[value]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI-style [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return json.dumps(content) if not isinstance(content, str) else content


def to_harmony_message(message: Any) -> Any:
    """One conversation message (a dict with role/content and optional channel/recipient/name/content_type,
    as in `Trace.messages`, or a harmony Message) as an openai-harmony Message."""
    from openai_harmony import Author, Message, Role

    if isinstance(message, Message):
        return message
    if not isinstance(message, dict) or "role" not in message:
        raise ValueError(f"a message must be a dict with 'role' and 'content', got {message!r}")
    role = str(message["role"])
    text = _text_of(message.get("content", ""))
    if role == "tool":
        name = message.get("name") or message.get("recipient_of") or "functions.unknown"
        name = name if "." in name or name in BUILTIN_NAMESPACES else f"functions.{name}"
        out = Message.from_author_and_content(Author.new(Role.TOOL, name), text)
        return out.with_channel(message.get("channel") or "commentary").with_recipient("assistant")
    try:
        harmony_role = Role(role)
    except ValueError as exc:
        raise ValueError(f"unknown role {role!r} (use user, assistant, tool, system or developer)") from exc
    out = Message.from_role_and_content(harmony_role, text)
    if message.get("channel"):
        out = out.with_channel(message["channel"])
    elif role == "assistant":
        out = out.with_channel("final")
    if message.get("recipient"):
        out = out.with_recipient(message["recipient"])
    if message.get("content_type"):
        out = out.with_content_type(message["content_type"])
    return out


def response_format_text(response_format: dict[str, Any]) -> str:
    """The developer-message section that asks for structured output (harmony's `# Response Formats`).

    `response_format` is {"name": ..., "schema": {...}, "description": optional} or a bare JSON schema.
    """
    if "schema" in response_format:
        name = response_format.get("name", "response")
        schema = response_format["schema"]
        description = response_format.get("description")
    else:
        name, schema, description = "response", response_format, None
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(name)):
        raise ValueError(f"response format name {name!r} must be an identifier")
    comment = f"// {description}\n" if description else ""
    return f"# Response Formats\n\n## {name}\n\n{comment}{json.dumps(schema, separators=(',', ':'))}"


class _LongTexts:
    """Stand-ins for long texts while openai-harmony renders, so its encoder never sees them whole.

    harmony's renderer encodes each message body in one call, which panics or crawls on a long piece (see
    ossscope.encode). A text longer than CHUNK_CHARS is replaced by a short marker; afterwards every rendered
    body holding a marker is decoded, the marker replaced by its text, and the body encoded again with
    `encode.encode_text` (bounded and chunked). Short texts render exactly as harmony renders them.
    """

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self._nonce = uuid.uuid4().hex[:12]

    def put(self, text: str, where: str) -> str:
        """The text itself when short, else a marker that stands for it. `where` names it in errors."""
        if len(text) <= encode.CHUNK_CHARS:
            return text
        if len(text) > encode.MAX_TEXT_CHARS:
            raise encode.EncodeError(f"{where} has {len(text):,} characters, more than the encoder's limit of "
                                     f"{encode.MAX_TEXT_CHARS:,} (ossscope.encode.MAX_TEXT_CHARS)")
        marker = f"OSSSCOPETEXT{self._nonce}N{len(self.texts)}END"
        self.texts[marker] = text
        return marker

    def restore(self, tokens: Sequence[int]) -> list[int]:
        """Rendered tokens with each marker's body re-encoded around the real text."""
        tokens = list(tokens)
        if not self.texts:
            return tokens
        enc = tk.harmony_encoding()
        out: list[int] = []
        i = 0
        while i < len(tokens):
            out.append(tokens[i])
            i += 1
            if tokens[i - 1] != tk.MESSAGE:
                continue
            end = i
            while end < len(tokens) and tokens[end] < tk.START_OF_TEXT:  # a body is ordinary text to a special
                end += 1
            body = enc.decode(tokens[i:end])
            if "OSSSCOPETEXT" + self._nonce in body:
                for marker, text in self.texts.items():
                    body = body.replace(marker, text)
                out += encode.encode_text(enc, body)
            else:
                out += tokens[i:end]
            i = end
        return out


def _guarded(render: Callable[..., Any], *args: Any) -> Any:
    """render(*args), with a failure of harmony's Rust side (a pyo3 PanicException is a BaseException, e.g. on
    a long text inside a harmony Message we could not swap out) turned into an EncodeError."""
    try:
        return render(*args)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, Exception) and not type(exc).__name__.endswith("PanicException"):
            raise  # harmony's own errors (HarmonyError, ValueError) say what is wrong already
        raise encode.EncodeError(f"openai-harmony failed to render the conversation: {type(exc).__name__}: "
                                 f"{str(exc)[:200]}") from exc


def render_prompt(
    messages_or_text: str | Sequence[Any],
    reasoning: str = "medium",
    developer: str | None = None,
    tools: Iterable[Any] | None = None,
    response_format: dict[str, Any] | None = None,
    model_identity: str | None = None,
    date: str | None = None,
    builtin_tools: Sequence[Any] = (),
) -> list[int]:
    """Render a conversation to o200k_harmony prompt tokens ending at `<|start|>assistant`.

    `messages_or_text` is a user message as text, or a list of messages (dicts as in `Trace.messages`, or
    openai-harmony Messages). Messages with role system/developer become developer instructions, after
    `developer`. `tools` are Python callables (schema from their signatures) or tool dicts. `builtin_tools`
    are harmony's built-in tools (`ossscope.tools.Browser` / `Python`, or ToolNamespaceConfigs), declared in
    the system message's `# Tools` section. Texts are encoded as plain text, bounded and chunked
    (ossscope.encode); raises EncodeError when one cannot be.
    """
    from openai_harmony import Conversation, DeveloperContent, Message, Role, SystemContent

    enc = tk.harmony_encoding()
    if isinstance(messages_or_text, str):
        messages_or_text = [{"role": "user", "content": messages_or_text}]
    long_texts = _LongTexts()
    instructions = [long_texts.put(developer, "the developer instructions")] if developer else []
    conversation = []
    for number, message in enumerate(messages_or_text):
        if isinstance(message, dict):
            where = f"message {number} ({message.get('role')})"
            message = {**message, "content": long_texts.put(_text_of(message.get("content", "")), where)}
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            instructions.append(message["content"])
        else:
            conversation.append(to_harmony_message(message))

    system = SystemContent.new().with_reasoning_effort(_effort(reasoning))
    if model_identity is not None:
        system = system.with_model_identity(model_identity)
    if date is not None:
        system = system.with_conversation_start_date(date)
    for builtin in builtin_tools:
        system = system.with_tools(builtin.tool_config() if hasattr(builtin, "tool_config") else builtin)
    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    tool_list = as_tools(tools)
    if instructions or tool_list or response_format:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions("\n\n".join(instructions))
        if tool_list:
            dev = dev.with_function_tools([t.to_harmony() for t in tool_list])
        head.append(Message.from_role_and_content(Role.DEVELOPER, dev))

    rendered = _guarded(enc.render_conversation_for_completion, Conversation.from_messages(head + conversation),
                        Role.ASSISTANT)
    tokens = long_texts.restore(rendered)
    if response_format:
        tokens = _add_response_format(tokens, response_format_text(response_format))
    return list(tokens)


def _add_response_format(tokens: list[int], section: str) -> list[int]:
    """Append a response-format section to the rendered developer message (openai-harmony 0.0.8 has no field
    for it). The message's text is decoded, extended and encoded again as one string, so the tokens are the
    ones harmony would give that text."""
    enc = tk.harmony_encoding()
    developer_start = None
    for i in range(len(tokens) - 1):
        if tokens[i] == tk.START and enc.decode(tokens[i + 1 : i + 2]) == "developer":
            developer_start = i
            break
    if developer_start is None:
        raise ValueError("no developer message to add the response format to")
    body_start = tokens.index(tk.MESSAGE, developer_start) + 1
    body_end = tokens.index(tk.END, body_start)
    text = enc.decode(tokens[body_start:body_end]) + "\n\n" + section
    return tokens[:body_start] + encode.encode_text(enc, text) + tokens[body_end:]


def render_tool_result(name: str, content: str, channel: str = "commentary") -> list[int]:
    """Tokens that hand a tool's answer back and reopen the assistant's turn:
    `<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>CONTENT<|end|><|start|>assistant`.
    A bare NAME means functions.NAME, except the built-in `python` (and `browser`); built-in tools answer on
    the channel of the call (`channel`).

    Raises EncodeError when the content cannot be encoded (see ossscope.encode). The last answers are cached:
    the chat loop renders an answer once to check it and once to feed it.
    """
    return list(_render_tool_result(name, content, channel))


@functools.lru_cache(maxsize=2)
def _render_tool_result(name: str, content: str, channel: str) -> tuple[int, ...]:
    full_name = name if "." in name or name in BUILTIN_NAMESPACES else f"functions.{name}"
    long_texts = _LongTexts()
    message = to_harmony_message({"role": "tool", "name": full_name, "channel": channel,
                                  "content": long_texts.put(content, f"the answer of {full_name}")})
    enc = tk.harmony_encoding()
    return (*long_texts.restore(_guarded(enc.render, message)), tk.START, *encode.encode_text(enc, "assistant"))


# -- tolerant parsing -----------------------------------------------------------------------------------------


_RECIPIENT = re.compile(r"to=([^\s<]+)")
_CONSTRAIN = re.compile(r"<\|constrain\|>\s*([^\s<]+)")


def parse_header(text: str, role: str | None) -> dict[str, Any]:
    """Read a message header: `[ROLE][ to=R]<|channel|>CHANNEL[ to=R][ <|constrain|>TYPE | TYPE]`.

    `role` is the role already known (the header follows `<|start|>assistant`), else the first word is it.
    """
    before, has_channel, after = text.partition("<|channel|>")
    if role is None:
        words = before.split()
        role = words[0] if words and not words[0].startswith("to=") else "assistant"
    channel = None
    content_type = None
    if has_channel:
        match = re.match(r"\s*([^\s<]+)", after)
        channel = match.group(1) if match else None
        rest = after[match.end() :] if match else after
        constrain = _CONSTRAIN.search(rest)
        if constrain:
            content_type = "<|constrain|>" + constrain.group(1)
        else:
            leftover = [w for w in _RECIPIENT.sub(" ", rest).split() if w]
            content_type = leftover[0] if leftover else None
    recipient = _RECIPIENT.search(text)
    return {
        "role": role,
        "channel": channel,
        "recipient": recipient.group(1) if recipient else None,
        "content_type": content_type,
    }


class HarmonyStreamParser:
    """Parse generated o200k_harmony tokens into messages, one token at a time, without ever raising.

    `feed(token)` returns that token's channel label ("analysis", "commentary", "final", or "" for headers,
    special tokens and text outside any channel). `messages` holds the messages so far (the open one included,
    marked `complete=False`); `errors` lists what was malformed, with token indices.

    `role="assistant"` (the default) means the stream starts right after `<|start|>assistant`, as a completion
    does; `role=None` means it starts expecting `<|start|>`. `offset` is added to every token index, so the
    messages of several turns can index one token list.
    """

    def __init__(self, role: str | None = "assistant", offset: int = 0):
        self.enc = tk.harmony_encoding()
        self.offset = offset
        self.index = offset  # index of the next token
        self.messages: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.stop_token: int | None = None  # <|return|> or <|call|> when the turn ended with one
        self._state = "start"
        self._open: dict[str, Any] | None = None
        self._header: list[int] = []
        self._content: list[int] = []
        if role is not None:
            self._begin_header(role, self.index)

    # -- state changes ----------------------------------------------------------------------------------
    def _begin_header(self, role: str | None, start: int) -> None:
        self._state = "header"
        self._header = []
        self._open = {"role": role, "start": start}

    def _begin_content(self, at: int) -> None:
        assert self._open is not None
        header_text = self.enc.decode(self._header)
        fields = parse_header(header_text, self._open["role"])
        self._open = {**fields, "start": self._open["start"], "content_start": at + 1}
        self._content = []
        self._state = "content"
        if fields["channel"] is None:
            self.errors.append(f"token {at}: message header {header_text!r} names no channel")
        elif fields["channel"] not in CHANNELS:
            self.errors.append(f"token {at}: unknown channel {fields['channel']!r}")

    def _close(self, end: int, complete: bool) -> None:
        """Close the open message; `end` is one past its last token."""
        if self._state == "content" and self._open is not None:
            self.messages.append(
                {
                    "role": self._open["role"],
                    "channel": self._open["channel"],
                    "recipient": self._open["recipient"],
                    "content_type": self._open["content_type"],
                    "content": self.enc.decode(self._content),
                    "token_range": [self._open["start"], end],
                    "content_range": [
                        self._open["content_start"],
                        self._open["content_start"] + len(self._content),
                    ],
                    "complete": complete,
                }
            )
        self._open = None
        self._state = "start"

    # -- the stream -------------------------------------------------------------------------------------
    def feed(self, token: int) -> str:
        """Take one generated token; return its channel label."""
        i = self.index
        self.index += 1
        token = int(token)
        special = token >= tk.START_OF_TEXT
        name = self.enc.decode([token]) if special else ""
        if self._state == "start":
            if token == tk.START:
                self._begin_header(None, i)
            elif token == tk.CHANNEL:
                self.errors.append(f"token {i}: <|channel|> without <|start|>; read as a new assistant message")
                self._begin_header("assistant", i)
                self._header.append(token)
            elif special:
                self.errors.append(f"token {i}: unexpected {name} between messages")
                if token in (tk.RETURN, tk.CALL):
                    self.stop_token = token
            else:
                self.errors.append(f"token {i}: text outside any message")
                self._open = {"role": "assistant", "channel": None, "recipient": None, "content_type": None}
                self._open.update(start=i, content_start=i)
                self._content = [token]
                self._state = "content"
            return ""
        if self._state == "header":
            if token == tk.MESSAGE:
                self._begin_content(i)
            elif token in (tk.START, *_CLOSERS):
                header = self.enc.decode(self._header)
                self.errors.append(f"token {i}: {name} inside the message header {header!r}; header dropped")
                self._open, self._state = None, "start"
                if token == tk.START:
                    self._begin_header(None, i)
                elif token in (tk.RETURN, tk.CALL):
                    self.stop_token = token
            else:
                self._header.append(token)
            return ""
        # content
        if token in _CLOSERS:
            self._close(i + 1, complete=True)
            if token in (tk.RETURN, tk.CALL):
                self.stop_token = token
            return ""
        if token in (tk.START, tk.CHANNEL):
            self.errors.append(f"token {i}: {name} inside a message; closing it and starting a new one")
            self._close(i, complete=False)
            self._begin_header(None if token == tk.START else "assistant", i)
            if token == tk.CHANNEL:
                self._header.append(token)
            return ""
        self._content.append(token)
        if special:  # kept in the text, but labelled like every special token
            self.errors.append(f"token {i}: special token {name} inside message text")
            return ""
        return (self._open["channel"] or "") if self._open else ""

    def copy(self) -> HarmonyStreamParser:
        """An independent parser in the same state (to `finish()` a snapshot while this one goes on)."""
        twin = object.__new__(HarmonyStreamParser)
        twin.__dict__.update(self.__dict__)
        twin.messages = [dict(m) for m in self.messages]
        twin.errors = list(self.errors)
        twin._open = dict(self._open) if self._open is not None else None
        twin._header, twin._content = list(self._header), list(self._content)
        return twin

    def feed_all(self, tokens: Iterable[int]) -> list[str]:
        """Feed many tokens; return their channel labels."""
        return [self.feed(t) for t in tokens]

    def finish(self) -> list[dict[str, Any]]:
        """End of the stream: keep an unclosed message (complete=False) and note it; return the messages."""
        if self._state == "content":
            self.errors.append(f"token {self.index}: generation ended before the message was closed")
            self._close(self.index, complete=False)
        elif self._state == "header" and self._header:
            self.errors.append(
                f"token {self.index}: generation ended inside a message header {self.enc.decode(self._header)!r}"
            )
            self._open, self._state = None, "start"
        elif self._state == "header":
            self._open, self._state = None, "start"
        return self.messages

    @property
    def current_channel(self) -> str | None:
        """The channel of the message being written, if its header is complete."""
        return self._open.get("channel") if self._state == "content" and self._open else None

    @property
    def current_recipient(self) -> str | None:
        return self._open.get("recipient") if self._state == "content" and self._open else None


def parse_completion(tokens: Sequence[int], role: str | None = "assistant") -> tuple[list[dict], list[str], list[str]]:
    """Parse a whole completion: (messages, per-token channel labels, errors). Never raises."""
    parser = HarmonyStreamParser(role=role)
    labels = parser.feed_all(tokens)
    messages = parser.finish()
    return messages, labels, parser.errors
