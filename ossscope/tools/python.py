"""harmony's built-in `python` tool: a stateful Jupyter kernel in a subprocess (jupyter_client).

The model sends code as the message to `python` (no JSON); the answer is what a notebook cell shows as text:
stdout and stderr, the value of the last expression (text/plain), and an exception's traceback. The kernel
keeps its state between calls, like the notebook the tool's description promises.

Limits, where the OS allows them (Linux): the kernel's address space is capped with `resource.setrlimit`
(RLIMIT_AS), and it runs in a network namespace of its own (no interfaces but a downed loopback) when the
process may create one (root, or unprivileged user namespaces). The kernel then talks to us over Unix-domain
sockets (zmq `ipc`), which a network namespace does not cut. `Python.sandbox` says which limits took.

A call that runs past `timeout` is interrupted (state kept) or, if the kernel does not answer the interrupt,
the kernel is restarted (state lost); a kernel that dies is restarted. Both are errors told to the model, with
any output it printed before. Long output is cut to `max_output_chars` (the reference browser's `...` cut).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import queue
import re
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from typing import Any

from ossscope.tools.base import ToolUsageError

_HARMONY_TIMEOUT = "time out after 120.0 seconds"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CLONE_NEWNET, _CLONE_NEWUSER = 0x40000000, 0x10000000


def _child_limits(memory_limit: int | None, isolate_network: bool) -> Callable[[], None] | None:
    """The function to run in the kernel's process between fork and exec: cap memory, leave the network.

    Everything it needs (the resource module, libc's unshare) is looked up here, in the parent: the child of
    a threaded process may only make plain system calls (an import could wait forever on a lock some other
    thread held at the fork). Best effort: what the OS refuses is left as it is (the parent checks what took).
    """
    setrlimit = None
    if memory_limit:
        try:
            import resource

            setrlimit = functools.partial(resource.setrlimit, resource.RLIMIT_AS, (memory_limit, memory_limit))
        except ImportError:  # not a Unix
            setrlimit = None
    unshare = None
    if isolate_network:
        try:
            unshare = ctypes.CDLL(None, use_errno=True).unshare
        except (OSError, AttributeError):
            unshare = None
    if setrlimit is None and unshare is None:
        return None

    def limit() -> None:
        if setrlimit is not None:
            with contextlib.suppress(ValueError, OSError):
                setrlimit()
        if unshare is not None and unshare(_CLONE_NEWNET) != 0:
            unshare(_CLONE_NEWUSER | _CLONE_NEWNET)

    return limit


def _net_namespace(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def _require_kernel(kernel_name: str) -> None:
    """Refuse at construction, not at the model's first call, where a missing kernel would only be an error told
    to the model and the chat would go on without the tool."""
    if importlib.util.find_spec("jupyter_client") is None:
        raise ImportError("the python tool runs code in a Jupyter kernel and needs jupyter_client and ipykernel "
                          "(pip install jupyter_client ipykernel); this environment has no jupyter_client")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    specs = KernelSpecManager()
    try:
        specs.get_kernel_spec(kernel_name)
    except NoSuchKernel:
        installed = ", ".join(sorted(specs.find_kernel_specs())) or "none"
        hint = " (pip install ipykernel)" if kernel_name == "python3" else ""
        raise ValueError(f"no Jupyter kernel named {kernel_name!r} here{hint}; installed: {installed}") from None


class Python:
    """harmony's `python` tool backed by a Jupyter kernel (started on the first call).

    timeout: seconds a call may run. declared_timeout: the seconds the tool's description promises the model
    (harmony's is `120.0`); None declares `timeout`. Set it apart to show a model the declaration it was trained
    on (the default 120 s, byte for byte) while enforcing a shorter limit: a call past `timeout` is still cut.
    memory_limit: bytes of address space for the kernel (None: no cap). network: False to cut the kernel off
    the network where the OS allows. max_output_chars: longest answer. kernel_name: which Jupyter kernel.
    Use as a context manager or call `close()`; an unreferenced tool shuts its kernel down too. Without
    jupyter_client or the kernel, construction raises (ImportError, ValueError).
    """

    name = "python"

    def __init__(
        self,
        timeout: float = 120.0,
        declared_timeout: float | None = None,
        memory_limit: int | None = 4 * 2**30,
        network: bool = False,
        max_output_chars: int = 4096,
        kernel_name: str = "python3",
    ):
        if not timeout > 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        if declared_timeout is not None and not declared_timeout > 0:
            raise ValueError(f"declared_timeout must be positive seconds, got {declared_timeout!r}")
        if memory_limit is not None and memory_limit < 64 * 2**20:
            raise ValueError(f"memory_limit {memory_limit} bytes is below the 64 MiB a kernel needs to start")
        if max_output_chars < 16:
            raise ValueError(f"max_output_chars must be at least 16, got {max_output_chars}")
        _require_kernel(kernel_name)
        self.timeout = float(timeout)
        self.declared_timeout = float(timeout if declared_timeout is None else declared_timeout)
        self.memory_limit = memory_limit
        self.network = network
        self.max_output_chars = max_output_chars
        self.kernel_name = kernel_name
        self.sandbox: dict[str, bool] = {}  # which limits took: memory_limit, no_network (after start)
        self.restarts = 0
        self._manager: Any = None
        self._client: Any = None
        self._workdir: str | None = None
        self._finalizer: Any = None

    # -- declaration ------------------------------------------------------------------------------------
    def tool_config(self) -> Any:
        """openai-harmony's ToolNamespaceConfig.python(), with this tool's declared timeout in its description
        (120 s, the default, keeps it byte for byte)."""
        from openai_harmony import ToolNamespaceConfig

        config = ToolNamespaceConfig.python()
        declared = f"time out after {self.declared_timeout} seconds"
        config.description = config.description.replace(_HARMONY_TIMEOUT, declared)
        return config

    def parse_arguments(self, function: str, text: str) -> dict[str, Any]:
        """The code is the whole message (harmony sends python code as text, not JSON)."""
        if function:
            raise ToolUsageError(f"unknown recipient python.{function}; send the code to `python` itself")
        return {"code": text}

    def call(self, function: str, arguments: dict[str, Any]) -> str:
        """Run `arguments["code"]` (see `run`)."""
        return self.run(arguments["code"])

    # -- the kernel -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the kernel now (otherwise the first call does)."""
        if self._manager is not None:
            return
        from jupyter_client import KernelManager

        self._workdir = tempfile.mkdtemp(prefix="ossscope-python-")
        isolate = not self.network and sys.platform.startswith("linux")
        # ipc (Unix sockets in the work folder) rather than tcp: a kernel in its own network namespace cannot
        # reach our loopback. Short path: Unix socket paths are limited to about 100 bytes.
        transport = {"transport": "ipc", "ip": os.path.join(self._workdir, "k")} if isolate else {}
        manager = KernelManager(kernel_name=self.kernel_name, **transport)
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        manager.start_kernel(cwd=self._workdir, env=env, preexec_fn=_child_limits(self.memory_limit, isolate))
        client = manager.client()
        client.start_channels()
        try:
            client.wait_for_ready(timeout=60)
        except RuntimeError as exc:
            manager.shutdown_kernel(now=True)
            raise RuntimeError(f"the Python kernel {self.kernel_name!r} did not start: {exc}") from exc
        self._manager, self._client = manager, client
        # Plain tracebacks: a few lines a model can read, not IPython's verbose frames with context.
        client.execute("%xmode Plain", silent=True)
        client.get_shell_msg(timeout=30)
        self._finalizer = weakref.finalize(self, _shutdown, manager, client, self._workdir)
        pid = getattr(getattr(manager, "provisioner", None), "pid", None)
        own, theirs = _net_namespace(), _net_namespace(pid) if pid else None
        self.sandbox = {
            "memory_limit": self.memory_limit is not None and _address_limit(pid) == self.memory_limit,
            "no_network": bool(isolate and own and theirs and own != theirs),
        }

    def close(self) -> None:
        """Shut the kernel down (a later call starts a new one, with fresh state)."""
        if self._finalizer is not None:
            self._finalizer()
        self._manager = self._client = self._finalizer = None

    def restart(self) -> None:
        """A fresh kernel: state lost."""
        self.close()
        self.restarts += 1
        self.start()

    def __enter__(self) -> Python:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- running code -----------------------------------------------------------------------------------
    def run(self, code: str) -> str:
        """Run code in the kernel; its text output. A timeout or a crash raises ToolUsageError (the model's
        answer), after interrupting or restarting the kernel."""
        if not isinstance(code, str):
            raise ToolUsageError(f"python takes code as text, got {type(code).__name__}")
        self.start()
        client = self._client
        msg_id = client.execute(code, allow_stdin=False, store_history=True)
        deadline = time.monotonic() + self.timeout
        parts: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._timed_out(parts)
            try:
                msg = client.get_iopub_msg(timeout=min(remaining, 0.25))
            except queue.Empty:
                if not self._manager.is_alive():
                    return self._died(parts)
                continue
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                parts.append(content.get("text", ""))
            elif kind in ("execute_result", "display_data"):
                text = content.get("data", {}).get("text/plain")
                if text is not None:
                    parts.append(text + "\n")
            elif kind == "error":
                lines = [line.rstrip("\n") for line in content.get("traceback", [])]
                parts.append(_ANSI.sub("", "\n".join(line for line in lines if line)) + "\n")
            elif kind == "status" and content.get("execution_state") == "idle":
                return self._cut("".join(parts))

    def _cut(self, text: str) -> str:
        limit = self.max_output_chars
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def _timed_out(self, parts: list[str]) -> str:
        self._manager.interrupt_kernel()
        if self._wait_idle(5.0):
            what = "it was interrupted (its state is kept)"
        else:
            self.restart()
            what = "it did not stop, so the kernel was restarted (its state is lost)"
        raise ToolUsageError(self._cut(f"timed out after {self.timeout} seconds; {what}." + _before(parts)))

    def _died(self, parts: list[str]) -> str:
        self.restart()
        raise ToolUsageError(
            self._cut("the Python kernel died while running the code (out of memory or a crash); it was "
                      "restarted and its state is lost." + _before(parts))  # fmt: skip
        )

    def _wait_idle(self, seconds: float) -> bool:
        """Drain messages until the kernel reports idle (True) or `seconds` pass (False)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                msg = self._client.get_iopub_msg(timeout=0.25)
            except queue.Empty:
                if not self._manager.is_alive():
                    return False
                continue
            if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                return True
        return False


def _before(parts: list[str]) -> str:
    output = "".join(parts)
    return f" Output before that:\n{output}" if output else ""


def _address_limit(pid: int | None) -> int | None:
    """The kernel's RLIMIT_AS soft limit in bytes, read from /proc (None where unknown or unlimited)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max address space"):
                    value = line.split()[3]
                    return int(value) if value.isdigit() else None
    except OSError:
        return None
    return None


def _shutdown(manager: Any, client: Any, workdir: str | None) -> None:
    try:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    except Exception:  # noqa: BLE001 - shutting down at exit: nothing useful to do with a failure
        pass
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)
