"""What chat's tool loop needs from harmony's built-in tools (`browser`, `python`), and the dispatch to them.

Function tools live in the developer message under `namespace functions`; the built-in tools are declared in
the *system* message (`# Tools` / `## browser` / `## python`) and are called by namespace: `to=browser.search`,
`to=browser.open`, `to=browser.find`, `to=python` (the code itself is the message, not JSON). Their answers
come back from `browser.search` / `python` on the channel the call was made on (the reference python tool does
this; the model makes built-in calls on the analysis channel, where its reasoning is).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from ossscope.trace import ToolCall


class ToolUsageError(Exception):
    """The model used a built-in tool wrongly (bad cursor, unknown link, timeout...): told to the model."""


@runtime_checkable
class BuiltinTool(Protocol):
    """A harmony built-in tool: a namespace name, its system-message declaration, and how to run one call."""

    name: str

    def tool_config(self) -> Any:
        """openai-harmony ToolNamespaceConfig declared in the system message."""

    def parse_arguments(self, function: str, text: str) -> dict[str, Any]:
        """The call's arguments from the message text; ToolUsageError when they are malformed."""

    def call(self, function: str, arguments: dict[str, Any]) -> str:
        """Run `NAME.FUNCTION` (function "" for a namespace called directly, like python); the answer text."""


def split_tools(tools: Iterable[Any] | None) -> tuple[dict[str, BuiltinTool], list[Any]]:
    """Separate built-in tools (Browser, Python) from function tools. Raises ValueError on two of a kind."""
    builtins: dict[str, BuiltinTool] = {}
    functions = []
    for tool in tools or ():
        if isinstance(tool, BuiltinTool) and not callable(tool):
            if tool.name in builtins:
                raise ValueError(f"two built-in tools named {tool.name!r}; pass one")
            builtins[tool.name] = tool
        else:
            functions.append(tool)
    return builtins, functions


def tool_configs(builtins: dict[str, BuiltinTool] | Iterable[BuiltinTool]) -> list[Any]:
    """The ToolNamespaceConfigs to declare in the system message, browser before python (harmony's order)."""
    tools = list(builtins.values()) if isinstance(builtins, dict) else list(builtins)
    order = {"browser": 0, "python": 1}
    return [t.tool_config() for t in sorted(tools, key=lambda t: order.get(t.name, 2))]


def builtin_for(builtins: dict[str, BuiltinTool], recipient: str | None) -> BuiltinTool | None:
    """The built-in tool a recipient (`browser.search`, `python`) addresses, or None (a function tool)."""
    namespace = (recipient or "").partition(".")[0]
    return builtins.get(namespace)


def answer_channel(builtins: dict[str, BuiltinTool], message: dict[str, Any]) -> str:
    """Channel of the tool's answer: a built-in tool answers on the call's channel, functions on commentary."""
    if builtin_for(builtins, message.get("recipient")) is not None and message.get("channel"):
        return str(message["channel"])
    return "commentary"


def run_builtin(tool: BuiltinTool, message: dict[str, Any], index: int) -> ToolCall:
    """Run one call of a built-in tool; every failure (bad arguments, usage error, crash, timeout) lands in
    `ToolCall.error`, which is what the model is told. `ToolCall.name` is the full recipient."""
    recipient = str(message.get("recipient") or tool.name)
    function = recipient.partition(".")[2]
    call = ToolCall(name=recipient, arguments=message.get("content", ""), token_index=index)
    try:
        call.parsed_arguments = tool.parse_arguments(function, call.arguments)
        call.result = tool.call(function, call.parsed_arguments)
    except ToolUsageError as exc:
        call.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - a broken tool is reported to the model, not raised into chat
        call.error = f"{type(exc).__name__}: {exc}"
    return call


def parse_json_arguments(recipient: str, text: str, schema: dict[str, Any] | None) -> dict[str, Any]:
    """JSON object arguments checked against a function's schema (as harmony declares it); ToolUsageError."""
    from ossscope.harmony import check_arguments

    text = text.strip()
    try:
        args = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise ToolUsageError(
            f"arguments of {recipient} are not valid JSON ({exc.msg} at character {exc.pos}): {text[:200]!r}"
        ) from exc
    problems = check_arguments(schema, args)
    if problems:
        raise ToolUsageError(f"bad arguments for {recipient}: " + "; ".join(problems))
    return args
