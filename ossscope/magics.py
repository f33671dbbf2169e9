"""`%oss` and `%%oss`: the common moves of an ossscope notebook, one line each.

    %load_ext ossscope
    %oss load nano                      # the notebook's current model, bound to `oss_model`
    %%oss chat --reasoning high         # the cell body is the user message; the Trace is bound to `_oss`
    What is 1234 + 987?
    %oss ablate 3:5,7 --mode zero       # until `%oss ablate --clear`
    %oss export run.html

The current model is whatever `oss_model` holds in the notebook, and the last trace is `_oss`: the magics keep
no hidden state, so `oss_model = ossscope.load(...)` in plain Python works with them too.

A user's mistake (unknown subcommand, bad flag or flag value, bad layer:expert, no model, missing file, a
checkpoint that does not load, a lambda as a tool) raises IPython's UsageError, which IPython shows as one
`UsageError: ...` line without a traceback. The line is not $-expanded: `$x` and `{expr}` reach the model as
typed (and IPython's expansion is quadratic in the line's length).
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import shlex
import textwrap
import time
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import MagicArgumentParser
from IPython.display import display

MODEL_NAME = "oss_model"  # the notebook variable holding the current model
PYTHON_TOOL_NAME = "oss_python"  # the notebook variable holding the python tool's kernel (`--python`)
TRACE_NAME = "_oss"  # the notebook variable holding the last trace


class _Parser(MagicArgumentParser):
    """An argparse parser whose errors are one line naming the subcommand (UsageError, never sys.exit)."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message} (see `%oss help {self.prog.split()[-1]}`)")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=110, max_help_position=30)


def _parser(name: str, description: str) -> _Parser:
    # argparse's plain formatter: IPython's MagicHelpFormatter writes reStructuredText for docstrings.
    return _Parser(prog=f"%oss {name}", description=description, formatter_class=_formatter)


def _build_parsers() -> dict[str, _Parser]:
    """One parser per subcommand; their help texts are what `%oss help` prints."""
    parsers = {}

    p = parsers["load"] = _parser("load", "Load a checkpoint (default: the built-in nano model) as the current "
                                  f"model, bound to `{MODEL_NAME}`.")
    p.add_argument("path", nargs="?", default="nano", metavar="PATH_OR_NAME",
                   help="a checkpoint folder, 'nano', 'gpt-oss-20b' or 'gpt-oss-120b' (from the HF cache)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if there is one)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--engine", choices=["auto", "kernels", "torch"], default="auto",
                   help="what runs chat and generation (default auto: the Triton kernels on a GPU, else torch)")

    p = parsers["chat"] = _parser("chat", "Chat with the current model: the cell body (or the rest of the line) "
                                  f"is the user message. Shows the tokens live, then the dashboard; the Trace "
                                  f"is bound to `{TRACE_NAME}`. Active ablations and steering apply.")
    p.add_argument("message", nargs="*", metavar="MESSAGE", help="the message, when not given as the cell body")
    p.add_argument("--reasoning", choices=["low", "medium", "high"], help="reasoning effort (default: medium)")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="generation budget (at least 1)")
    p.add_argument("--temperature", type=float, metavar="T", help="finite, >= 0; 0 means greedy")
    p.add_argument("--seed", type=int, metavar="S", help="sampling seed, 0..2**63-1")
    p.add_argument("--tools", metavar="f,g", help="names of Python functions in the notebook the model may call")
    p.add_argument("--developer", metavar="TEXT", help="developer instructions")
    p.add_argument("--browser", metavar="DIR", help="give the model harmony's browser tool over the .txt/.md/.html "
                   "files in DIR (or over a notebook variable holding an ossscope.tools.Browser)")
    p.add_argument("--python", action="store_true", help="give the model harmony's python tool: a Jupyter kernel "
                   f"kept in `{PYTHON_TOOL_NAME}` across chats")
    p.add_argument("--no-show", action="store_true", help="print the answer instead of showing the dashboard")

    p = parsers["ablate"] = _parser("ablate", "Ablate experts in the following chats until cleared (replaces any "
                                    "earlier ablation); with no argument, list what is ablated.")
    p.add_argument("specs", nargs="*", metavar="L:E[,E...]", help="layer:experts, e.g. 3:5,7 (several allowed)")
    p.add_argument("--mode", choices=["reroute", "zero"], default="reroute",
                   help="reroute: the router picks the next-best expert; zero: drop the expert's output")
    p.add_argument("--clear", action="store_true", help="remove every ablation")

    p = parsers["steer"] = _parser("steer", "Add scale * VECTOR to the residual stream after LAYER on every token "
                                   "until cleared; with no argument, list the active steering.")
    p.add_argument("layer", nargs="?", type=int, metavar="LAYER")
    p.add_argument("vector", nargs="?", metavar="VECTOR", help="name of a [hidden_size] tensor in the notebook")
    p.add_argument("--scale", type=float, default=1.0, help="multiplier (default 1.0)")
    p.add_argument("--clear", action="store_true", help="remove the steering (of LAYER only, if given)")

    parsers["trace"] = _parser("trace", f"Show the last trace (`{TRACE_NAME}`) in the dashboard again.")

    p = parsers["export"] = _parser("export", f"Write the last trace (`{TRACE_NAME}`) as one self-contained HTML "
                                    "file that works without a kernel.")
    p.add_argument("path", metavar="PATH.html")

    p = parsers["help"] = _parser("help", "Usage of every subcommand, or of one.")
    p.add_argument("subcommand", nargs="?")
    return parsers


PARSERS = _build_parsers()
_SPEC = re.compile(r"(\d+):(\d+(?:,\d+)*)")


def parse_ablation_specs(specs: list[str]) -> dict[int, list[int]]:
    """["3:5,7", "1:0"] -> {3: [5, 7], 1: [0]}; the same layer twice merges. Raises UsageError on bad text."""
    experts: dict[int, list[int]] = {}
    for spec in specs:
        match = _SPEC.fullmatch(spec)
        if not match:
            raise UsageError(f"%oss ablate: cannot read {spec!r}: write LAYER:EXPERT[,EXPERT...], e.g. 3:5,7")
        layer = int(match.group(1))
        experts.setdefault(layer, []).extend(int(e) for e in match.group(2).split(","))
    return {layer: sorted(set(chosen)) for layer, chosen in experts.items()}


def usage(subcommand: str | None = None) -> str:
    """The help text of one subcommand, or a summary of all of them."""
    if subcommand is not None:
        return PARSERS[subcommand].format_help()
    lines = ["%oss subcommands (`%oss help NAME` for details):", ""]
    for name, parser in PARSERS.items():
        line = parser.format_usage().strip().removeprefix("usage: ")
        if name == "chat":
            line = "%" + line + "\n        (cell magic: the cell body is the message)"
        lines.append("  " + line)
        lines += textwrap.wrap(parser.description or "", width=104, initial_indent=" " * 6, subsequent_indent=" " * 6)
    lines += ["", f"Current model: `{MODEL_NAME}`; last trace: `{TRACE_NAME}`."]
    return "\n".join(lines)


@magics_class
class OssMagics(Magics):
    """The %oss line magic and %%oss cell magic (registered by `%load_ext ossscope`)."""

    @line_cell_magic
    @no_var_expand  # a message is sent as typed ($x, {expr} stay text), and IPython's expansion is quadratic
    def oss(self, line: str, cell: str | None = None) -> None:
        """ossscope in one line: `%oss load`, `%%oss chat`, `%oss ablate`, `%oss steer`, `%oss trace`,
        `%oss export`, `%oss help`."""
        try:
            words = shlex.split(line)
        except ValueError as exc:  # an unclosed quote
            hint = ("; a message with an apostrophe or a quote goes in the cell body (%%oss chat, the message below), "
                    "sent exactly as typed") if line.lstrip().startswith("chat") else ""
            raise UsageError(f"%oss: cannot split the line: {exc}{hint}") from None
        if not words:
            print(usage())
            return
        name, rest = words[0], words[1:]
        if name not in PARSERS:
            close = difflib.get_close_matches(name, PARSERS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(f"%oss: unknown subcommand {name!r}; {hint}subcommands are {', '.join(PARSERS)}")
        if cell is not None and name != "chat" and cell.strip():
            raise UsageError(f"%%oss {name} takes no cell body (only %%oss chat does): use the line magic %oss {name}")
        if "-h" in rest or "--help" in rest:
            print(usage(name))
            return
        args = PARSERS[name].parse_args(rest)
        getattr(self, f"_{name}")(args, cell)

    # -- state in the notebook ---------------------------------------------------------------------------
    def _model(self) -> Any:
        from .model import Model

        model = self.shell.user_ns.get(MODEL_NAME)
        if model is None:
            raise UsageError("no model loaded: run `%oss load nano` (or a checkpoint path) first")
        if not isinstance(model, Model):
            raise UsageError(f"`{MODEL_NAME}` holds a {type(model).__name__}, not an ossscope model: "
                             "run `%oss load` again")
        return model

    def _last_trace(self) -> Any:
        from .trace import Trace

        trace = self.shell.user_ns.get(TRACE_NAME)
        if not isinstance(trace, Trace):
            raise UsageError(f"no trace yet: run a `%%oss chat` cell first (the last trace is kept in `{TRACE_NAME}`)")
        return trace

    # -- subcommands -------------------------------------------------------------------------------------
    def _help(self, args: argparse.Namespace, cell: str | None) -> None:
        if args.subcommand is not None and args.subcommand not in PARSERS:
            raise UsageError(f"%oss help: no subcommand {args.subcommand!r}; subcommands are {', '.join(PARSERS)}")
        print(usage(args.subcommand))

    def _load(self, args: argparse.Namespace, cell: str | None) -> None:
        import torch

        from .loading import CheckpointError, load

        if args.device is not None:
            try:
                device = torch.device(args.device)
            except RuntimeError:
                raise UsageError(f"%oss load: --device {args.device!r} is not a device (try cpu or cuda)") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise UsageError("%oss load: --device cuda asked for, but torch sees no CUDA GPU here")
        try:
            model = load(args.path, device=args.device, dtype=args.dtype, progress=True, engine=args.engine)
        except (OSError, CheckpointError, ValueError) as exc:  # OSError: missing, unreadable (permissions)
            raise UsageError(f"%oss load: {exc}") from None
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
            text = str(exc)
            if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and "can't allocate memory" not in text:
                raise  # a bug, not the user's to fix: keep the traceback
            where = args.device or "the default device"
            detail = text[text.find("you tried"):].splitlines()[0] if "you tried" in text else type(exc).__name__
            raise UsageError(f"%oss load: not enough memory for {args.path} on {where} ({detail})") from None
        self.shell.user_ns[MODEL_NAME] = model
        c = model.config
        print(f"loaded {model.name} as `{MODEL_NAME}`: {c.num_hidden_layers} layers, {c.num_experts} experts "
              f"(top-{c.experts_per_token}), d_model {c.hidden_size}, vocab {c.vocab_size}, "
              f"{str(model.dtype).removeprefix('torch.')} on {model.device}, engine {model.engine.describe()}")

    def _chat(self, args: argparse.Namespace, cell: str | None) -> None:
        model = self._model()
        body = (cell or "").strip()
        if body and args.message:
            raise UsageError("%%oss chat: give the message either in the cell body or on the line, not both")
        message = body or " ".join(args.message)
        if not message:
            raise UsageError("%%oss chat: no message: write it in the cell body below `%%oss chat`")
        options: dict[str, Any] = {
            "reasoning": args.reasoning, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "seed": args.seed, "developer": args.developer,
        }
        _check_sampling_flags(args)
        options = {key: value for key, value in options.items() if value is not None}  # chat's defaults rule
        tools = self._tools(args.tools) if args.tools else []
        tools += self._builtin_tools(args.browser, args.python)
        if tools:
            options["tools"] = tools

        try:  # the chat checks its prompt and options here, before generating: a mistake is one line
            stream = model.chat(message, stream=True, **options)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"%%oss chat: {exc}") from None
        live = LiveDashboard(model, message, args.reasoning or "medium") if not args.no_show else None
        interrupted = False
        try:
            for event in stream:
                if live is not None:
                    live.add(event)
        except KeyboardInterrupt:  # the kernel's stop button: keep what was generated so far
            stream.close()
            interrupted = True
        trace = stream.trace
        self.shell.user_ns[TRACE_NAME] = trace
        if live is not None:
            live.finish(trace)
        else:
            print(_summary(trace))
        if interrupted:
            print(f"interrupted after {len(trace.tokens)} tokens; the partial trace is in `{TRACE_NAME}`")

    def _tools(self, names: str) -> list[Any]:
        from .harmony import Tool

        tools = []
        for name in filter(None, (n.strip() for n in names.split(","))):
            fn = self.shell.user_ns.get(name)
            if fn is None:
                raise UsageError(f"%%oss chat: --tools names {name!r}, but the notebook has no such function")
            if not callable(fn):
                raise UsageError(f"%%oss chat: --tools names {name!r}, which is a {type(fn).__name__}, not a function")
            if getattr(fn, "__name__", None) == "<lambda>":  # the model calls a tool by its name: it needs one
                raise UsageError(f"%%oss chat: --tools {name} is a lambda, which has no name to call it by: "
                                 f"define it with `def {name}(...):`")
            try:  # e.g. a builtin without a signature, or a callable object without a __name__
                tools.append(Tool.from_function(fn))
            except (ValueError, TypeError) as exc:
                raise UsageError(f"%%oss chat: --tools {name}: {exc}") from None
        if not tools:
            raise UsageError("%%oss chat: --tools needs function names, e.g. --tools get_weather,convert")
        return tools

    def _builtin_tools(self, browser: str | None, python: bool) -> list[Any]:
        """harmony's built-in tools for `--browser DIR` (a fresh browser: one conversation, one page stack) and
        `--python` (the notebook's kernel in `oss_python`, made on first use, so its state outlives a chat)."""
        from ossscope.tools import Browser, Python

        tools: list[Any] = []
        if browser is not None:
            given = self.shell.user_ns.get(browser) if browser.isidentifier() else None
            if isinstance(given, Browser):
                given.reset()
                tools.append(given)
            else:
                try:
                    tools.append(Browser(Path(browser).expanduser()))
                except ValueError as exc:
                    raise UsageError(f"%%oss chat: --browser: {exc}") from None
        if python:
            kernel = self.shell.user_ns.get(PYTHON_TOOL_NAME)
            if not isinstance(kernel, Python):
                kernel = self.shell.user_ns[PYTHON_TOOL_NAME] = Python()
            tools.append(kernel)
        return tools

    def _ablate(self, args: argparse.Namespace, cell: str | None) -> None:
        model = self._model()
        if args.clear:
            if args.specs:
                raise UsageError("%oss ablate: --clear takes no L:E specs")
            model.clear_ablation()
        elif args.specs:
            experts = parse_ablation_specs(args.specs)
            try:
                model.set_ablation(experts, mode=args.mode)
            except ValueError as exc:
                raise UsageError(f"%oss ablate: {exc}") from None
        print(describe_ablation(model.active_ablation))

    def _steer(self, args: argparse.Namespace, cell: str | None) -> None:
        import torch

        model = self._model()
        if args.clear:
            if args.vector is not None:
                raise UsageError("%oss steer: --clear takes at most a LAYER, not a vector")
            if args.layer is not None and not 0 <= args.layer < model.config.num_hidden_layers:
                raise UsageError(f"%oss steer: layer {args.layer} is out of range: the model has layers "
                                 f"0..{model.config.num_hidden_layers - 1}")
            model.clear_steering(args.layer)
        elif args.layer is not None:
            if args.vector is None:
                raise UsageError("%oss steer: name the vector too: %oss steer LAYER VECTOR [--scale S]")
            if args.vector not in self.shell.user_ns:
                raise UsageError(f"%oss steer: the notebook has no variable named {args.vector!r}")
            try:
                vector = torch.as_tensor(self.shell.user_ns[args.vector])
                model.set_steering(args.layer, vector, scale=args.scale)
            except (ValueError, TypeError, RuntimeError) as exc:
                raise UsageError(f"%oss steer: {args.vector}: {exc}") from None
        print(describe_steering(model.active_steering))

    def _trace(self, args: argparse.Namespace, cell: str | None) -> None:
        from .model import Model

        model = self.shell.user_ns.get(MODEL_NAME)
        _show(self._last_trace(), model if isinstance(model, Model) else None)

    def _export(self, args: argparse.Namespace, cell: str | None) -> None:
        trace = self._last_trace()
        path = Path(args.path).expanduser()
        if path.suffix.lower() not in (".html", ".htm"):
            raise UsageError(f"%oss export writes HTML: give a path ending in .html, not {args.path!r}")
        if not path.parent.is_dir():
            raise UsageError(f"%oss export: the folder {str(path.parent)!r} does not exist")
        if path.is_dir():
            raise UsageError(f"%oss export: {str(path)!r} is a folder: give a file path, "
                             f"e.g. {str(path / 'run.html')!r}")
        try:
            written = Path(trace.to_html(path))
        except OSError as exc:  # no permission, disk full: the user's to fix, not a traceback
            raise UsageError(f"%oss export: cannot write {str(path)!r}: {exc.strerror or exc}") from None
        print(f"wrote {written} ({written.stat().st_size / 1e6:.2f} MB): open it in any browser, no kernel needed")


SEED_LIMIT = 2**63  # torch generators take seeds below 2**64; the chat records seeds in signed 64 bits


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Refuse chat flags the model would choke on (argparse has checked only that they are numbers)."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"%%oss chat: --max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UsageError(f"%%oss chat: --temperature must be a finite number >= 0 (0 is greedy), "
                         f"got {args.temperature}")
    if args.seed is not None and not 0 <= args.seed < SEED_LIMIT:
        raise UsageError(f"%%oss chat: --seed must be in 0..2**63-1, got {_short_number(args.seed)}")


def _short_number(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}... ({len(text)} digits)"


def describe_ablation(active: dict[str, Any]) -> str:
    """One line saying which experts are ablated, e.g. `ablated (reroute): layer 3: experts 5, 7`."""
    if not active:
        return "no experts ablated"
    layers = "; ".join(f"layer {layer}: expert{'s' if len(ex) > 1 else ''} {', '.join(map(str, ex))}"
                       for layer, ex in sorted(active["experts"].items()))
    return f"ablated ({active['mode']}) in the following chats: {layers}"


def describe_steering(active: dict[int, Any]) -> str:
    """One line listing the steered layers with the norm of the vector added there."""
    if not active:
        return "no steering"
    parts = [f"layer {layer} (|vector| = {vector.float().norm().item():.3g})"
             for layer, vector in sorted(active.items())]
    return "steering in the following chats: " + ", ".join(parts)


def _summary(trace: Any) -> str:
    lines = []
    if trace.analysis:
        lines.append(f"analysis: {trace.analysis}")
    for call in trace.tool_calls:
        lines.append(f"tool call: {call.name}({call.arguments}) -> {call.result if call.error is None else call.error}")
    lines.append(f"final: {trace.final}")
    return "\n".join(lines)


def _show(trace: Any, model: Any = None) -> None:
    """Display the dashboard of a trace (ossscope.widgets.Lab), ready to run more when a model is given."""
    from ossscope.widgets import show_trace

    display(show_trace(trace, model=model))


class LiveDashboard:
    """The trace views of a chat while it generates, redrawn from the streamed token events, then replaced in
    place by the full dashboard of the finished trace.

    Redraws are throttled (each one sends the whole partial trace to the front end).
    """

    def __init__(self, model: Any, message: str, reasoning: str, interval_s: float = 0.25):
        from ossscope.widgets import LiveRecord, TraceView

        c = model.config
        self.model = model
        self.title = "live: " + message[:40]
        self.record = LiveRecord(message, reasoning, c.num_hidden_layers, c.experts_per_token,
                                 c.num_attention_heads, c.num_experts, model.name)
        self.view = TraceView(self.record.trace(), titles=[self.title])
        self.handle = display(self.view, display_id=True)
        self.interval_s = interval_s
        self._last = time.monotonic()

    def add(self, event: Any) -> None:
        """Take one streamed TokenEvent; redraw if the last redraw is old enough."""
        self.record.add(event)
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self.view.set_traces([self.record.trace()], titles=[self.title])

    def finish(self, trace: Any) -> None:
        from ossscope.widgets import show_trace

        self.handle.update(show_trace(trace, model=self.model))


def load_ipython_extension(ipython: Any) -> None:
    """Register %oss / %%oss in an IPython shell (`%load_ext ossscope`)."""
    ipython.register_magics(OssMagics)
