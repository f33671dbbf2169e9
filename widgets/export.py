"""One self-contained, interactive HTML file for one or more Traces: viewer script, styles and data inline,
nothing fetched when it opens, no kernel needed."""

from __future__ import annotations

import html
import os
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ossscope.trace import Trace

from .payload import dumps_for_html, trace_payload


def static_text(name: str) -> str:
    """A file shipped in widgets/static/ (package data), as text."""
    return resources.files("ossscope.widgets").joinpath("static", name).read_text(encoding="utf-8")


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; \
style-src 'unsafe-inline'; img-src data:">
<title>{title}</title>
<style>
body {{ margin: 16px; background: #eef1f4; }}
{css}
</style>
</head>
<body>
<div id="ossscope-root"></div>
<script type="application/json" id="ossscope-data">{data}</script>
<script>
{js}
</script>
<script>
(function () {{
  var payloads = JSON.parse(document.getElementById("ossscope-data").textContent);
  window.OSSScope.mount(document.getElementById("ossscope-root"), payloads, {{}});
}})();
</script>
</body>
</html>
"""


def render_html(payloads: Sequence[dict[str, Any]], title: str = "ossscope trace") -> str:
    """The page for payloads from `trace_payload` (several runs get a run selector).

    Script-safety: the data goes through `dumps_for_html` and the title through html.escape; the viewer puts
    text into the page with textContent only, and the Content-Security-Policy forbids any fetch.
    """
    # The script and style are our own files; a stray closing tag in them would still end the element.
    js, css = static_text("scope.js"), static_text("scope.css")
    for name, text, tag in (("scope.js", js, "</script"), ("scope.css", css, "</style")):
        if tag in text.lower():
            raise ValueError(f"widgets/static/{name} contains '{tag}', which would end its inline element")
    return _PAGE.format(title=html.escape(title), css=css, js=js, data=dumps_for_html(list(payloads)))


def export_trace_html(
    trace: Trace | Sequence[Trace],
    path: str | Path,
    *,
    title: str | None = None,
    titles: Sequence[str] | None = None,
    **payload_kwargs: Any,
) -> Path:
    """Write `trace` (or several traces, e.g. a Lab's run history) as one interactive HTML file; returns the path.

    The file opens offline in any browser: token hover/click panels, layer, head, channel and metric choices,
    the router map, sinks, and attention and logit lens where the trace captured them. The folder must exist
    (FileNotFoundError otherwise; nothing is created); `path` being a folder raises IsADirectoryError.
    """
    path = Path(path)
    check_target_folder(path)  # before the payloads: a mistyped folder should not wait for a long trace's render
    traces = [trace] if isinstance(trace, Trace) else list(trace)
    if not traces:
        raise ValueError("export_trace_html needs at least one trace")
    names = list(titles) if titles is not None else [None] * len(traces)
    if len(names) != len(traces):
        raise ValueError(f"got {len(names)} titles for {len(traces)} traces")
    payloads = [trace_payload(t, title=name, **payload_kwargs) for t, name in zip(traces, names, strict=True)]
    page_title = title or payloads[0]["title"]
    write_atomically(path, render_html(payloads, title=page_title))
    return path


def check_target_folder(path: Path) -> None:
    """Refuse a path whose folder is missing, the way `%oss export` and `python -m ossscope demo --out` do:
    creating folders on the caller's behalf turns a typo into a stray directory tree. Raises FileNotFoundError
    naming the folder (NotADirectoryError when that name is a file)."""
    folder = path.parent
    if folder.is_dir():
        return
    if folder.exists():
        raise NotADirectoryError(f"cannot write {path}: {folder} is a file, not a folder")
    raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist (create it first)")


def write_atomically(path: Path, text: str) -> None:
    """Write text (UTF-8) to a temporary file beside `path`, then rename it over `path`: a reader, or a crash
    mid-write, sees the old file or the whole new one, never half a page. Raises IsADirectoryError when
    `path` is a folder."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path ending in .html")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp makes the file 0600; keep the mode of the file we replace, else an ordinary file's
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
