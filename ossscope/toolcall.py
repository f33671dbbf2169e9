"""Calling a tool's Python function for the chat loop: with a time limit, awaiting coroutines, and turning
whatever comes back into the text the model reads (JSON when it is not already text).

Every failure is a ToolError whose message is what the model is told (`ToolCall.error`), never an exception
out of the chat: the function raised, it ran past its time limit, or its result cannot be written as JSON.

The function runs in a thread of its own so that a hung call can be abandoned: after `timeout_s` the chat goes
on with an error answer, and the thread (a daemon) is left to finish or hang by itself; Python cannot stop it.
A coroutine function (`async def`) is awaited on an event loop of that thread, so it works inside Jupyter's
running loop too, and is cancelled at the time limit.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import dataclasses
import datetime
import enum
import inspect
import json
import math
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

DEFAULT_TIMEOUT_S = 60.0  # a tool's time limit unless it sets its own (Tool.timeout_s; math.inf: none)


class ToolError(Exception):
    """A tool call that gave no usable answer; the message is what the model is told."""


def check_timeout(timeout_s: Any) -> float | None:
    """A tool's time limit as given (None: the default; a positive number of seconds; math.inf: no limit)."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"a tool's timeout_s must be a positive number of seconds (math.inf for none), "
                         f"got {timeout_s!r}")
    return float(timeout_s)


def run_with_timeout(fn: Callable[..., Any], args: Mapping[str, Any], timeout_s: float | None) -> Any:
    """fn(**args), awaited if it returns an awaitable; ToolError if it raises or runs past timeout_s."""
    limit = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            result = fn(**args)
            if inspect.isawaitable(result):
                result = asyncio.run(_await(result, limit))
            outcome["result"] = result
        except BaseException as exc:  # noqa: BLE001 - whatever the tool raises is reported to the model
            outcome["error"] = exc

    thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), daemon=True,
                              name=f"ossscope-tool-{getattr(fn, '__name__', 'call')}")
    thread.start()
    thread.join(None if math.isinf(limit) else limit)
    if thread.is_alive() or isinstance(outcome.get("error"), _TimedOut):
        raise ToolError(f"the tool did not answer within {limit:g} s")
    if "error" in outcome:
        exc = outcome["error"]
        raise ToolError(f"{type(exc).__name__}: {exc}") from exc
    return outcome["result"]


class _TimedOut(Exception):
    """The awaited tool ran past its limit (kept apart from a TimeoutError the tool raises itself)."""


async def _await(awaitable: Any, limit: float) -> Any:
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=None if math.isinf(limit) else limit)
    if not done:
        task.cancel()
        raise _TimedOut
    return task.result()


def answer_text(result: Any) -> str:
    """A tool's result as the text the model reads: text as it is, anything else as JSON.

    bytes become their UTF-8 text; NaN and infinities become null (JSON has no such numbers); tuples and sets
    become lists; numpy and torch values become numbers or lists; dataclasses objects; enums their values;
    paths and dates their text. Anything else is a ToolError naming the type.
    """
    if isinstance(result, str):
        return result
    if isinstance(result, (bytes, bytearray, memoryview)):
        return _bytes_text(bytes(result), "the tool's result")
    return json.dumps(_jsonable(result, "the result"), ensure_ascii=False, allow_nan=False)


def _bytes_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError(f"{where} is {len(data)} bytes that are not UTF-8 text; return text (base64 for binary "
                        f"data, e.g. {base64.b64encode(data[:6]).decode()!r}...)") from None


def _jsonable(value: Any, where: str) -> Any:
    """value as plain JSON data (see answer_text); `where` names the place in errors."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return _jsonable(value.value, where)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _bytes_text(bytes(value), where)
    if isinstance(value, Mapping):
        return {_key(k, where): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy arrays and scalars, torch tensors
        return _jsonable(value.tolist(), where)
    raise ToolError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which has no JSON "
                    "form: return text, numbers, lists or dicts")


def _key(key: Any, where: str) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float, enum.Enum)):
        return json.dumps(_jsonable(key, where))  # how json.dumps itself writes such keys
    raise ToolError(f"{where} has a key of type {type(key).__name__}; JSON object keys are text")
