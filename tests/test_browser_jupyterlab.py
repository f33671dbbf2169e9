"""JupyterLab in headless Chromium: the test starts a server (free localhost port, no token, temporary root),
runs notebooks/01_quickstart.ipynb in the browser, and checks that the dashboard renders; a screenshot is kept
under test-artifacts/. Requests that leave the server are blocked."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}"),
]


KERNEL_READY = """() => {
    const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    const kernel = widget && widget.sessionContext && widget.sessionContext.session
        && widget.sessionContext.session.kernel;
    return Boolean(kernel && widget.sessionContext.isReady && kernel.status === "idle"
        && kernel.connectionStatus === "connected");
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a free port serving a temporary folder with the quickstart notebook."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "01_quickstart.ipynb", root)
    port = _free_port()
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp_path / "config"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "ws"))
    # Render every cell: with JupyterLab 4's default windowing, cells scrolled out of view are hidden.
    tracker_settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    tracker_settings.mkdir(parents=True)
    (tracker_settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}", "--ip=127.0.0.1",
             "--IdentityProvider.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
             f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.expose_app_in_browser=True"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{base}/api/status", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        raise RuntimeError("JupyterLab did not start:\n" + log_path.read_text()) from None
                    time.sleep(0.3)
            yield base
        finally:
            _stop(server)


def _stop(server: subprocess.Popen) -> None:
    """End the server and the kernels it started: its own session, started by this test."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def test_quickstart_runs_in_jupyterlab_and_the_dashboard_renders(jupyterlab):
    sync_api = pytest.importorskip("playwright.sync_api")
    blocked: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1000})

            def route(r):
                if r.request.url.startswith(jupyterlab) or r.request.url.startswith("data:"):
                    r.continue_()
                else:
                    blocked.append(r.request.url)
                    r.abort()

            context.route("**/*", route)
            page = context.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{jupyterlab}/lab/tree/01_quickstart.ipynb")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            # Wait for the kernel itself: the toolbar reads "idle" before a kernel exists, and Run All then does
            # nothing. Run All goes through the app's command registry (menu markup changes between versions).
            page.wait_for_function(KERNEL_READY, timeout=90_000)
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            # The dashboard (the Lab around the trace viewer), then the last cell's line.
            page.wait_for_selector(".ossscope-lab .oss-scope .oss-tok", state="attached", timeout=120_000)
            page.wait_for_selector("text=/exported 2 runs/", timeout=120_000)
            lab = page.locator(".ossscope-lab").first
            lab.scroll_into_view_if_needed()
            lab.locator(".lm-TabBar-tab:has-text('Trace')").first.click()  # the notebook left it on Compare runs
            lab.locator(".oss-tok").nth(3).click()
            assert lab.locator(".oss-panel-title[data-token='3']").count() == 1
            ARTIFACTS.mkdir(exist_ok=True)
            lab.screenshot(path=str(ARTIFACTS / "jupyterlab_dashboard.png"))
            compare = page.locator(".ossscope-lab").first
            compare.locator(".lm-TabBar-tab:has-text('Compare runs')").click()
            page.wait_for_selector(".ossscope-lab .js-plotly-plot", timeout=30_000)
            compare.screenshot(path=str(ARTIFACTS / "jupyterlab_compare.png"))
            page.screenshot(path=str(ARTIFACTS / "jupyterlab_quickstart.png"), full_page=True)
            failures = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            tracebacks = [t for t in failures.all_inner_texts() if "Traceback" in t or "Error" in t]
            assert tracebacks == [], tracebacks
            assert page.locator(".ossscope-lab .oss-scope").count() >= 1
            assert page.locator(".oss-grid .oss-grid-cell.on").count() == 2  # the picker shows the two experts
        except Exception:
            ARTIFACTS.mkdir(exist_ok=True)  # what the page showed when it failed, for whoever reads the CI log
            page.screenshot(path=str(ARTIFACTS / "jupyterlab_failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert [e for e in errors if "ossscope" in e.lower() or "OSSScope" in e] == []
