"""The exported HTML in real headless Chromium (Debian's /usr/bin/chromium driven by playwright), with every
network request blocked and recorded: it renders with no script errors, a click on a token updates its panel,
injected markup does not run, and the JavaScript metrics agree with Python's."""

from __future__ import annotations

import os
import time
from pathlib import Path

import ossscope.widgets as W
import pytest
from _widget_fixtures import EVIL, synthetic_trace

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}"),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield chromium
        chromium.close()


class OfflinePage:
    """A page that may load only `allowed_prefix` URLs; everything else is aborted and recorded."""

    def __init__(self, browser, allowed_prefix: str, viewport=(1400, 900)):
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(f"console: {msg.text}"))
        self.page.on("request", self._request)
        self.allowed_prefix = allowed_prefix

    def _request(self, request) -> None:
        if not request.url.startswith(self.allowed_prefix) and not request.url.startswith("data:"):
            self.blocked.append(request.url)

    def _route(self, route) -> None:
        if route.request.url.startswith(self.allowed_prefix):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def offline(browser):
    pages = []

    def open_file(path: Path, **kwargs) -> OfflinePage:
        url = path.resolve().as_uri()
        page = OfflinePage(browser, url, **kwargs)
        pages.append(page)
        page.page.goto(url)
        page.page.wait_for_selector(".oss-scope .oss-tok")
        return page

    yield open_file
    for page in pages:
        page.close()


def test_export_renders_offline_and_injected_markup_stays_text(offline, tmp_path):
    trace = synthetic_trace(T=40, user_text=EVIL, evil_token=True)
    trace.final = EVIL
    view = offline(trace.to_html(tmp_path / "evil.html"))
    page = view.page
    assert page.locator(".oss-tok").count() == 40
    assert page.evaluate("window.__pwned") is None  # the onerror handler never ran
    assert page.locator(".oss-scope img").count() == 0
    text = page.inner_text(".oss-convo")
    assert '<img src=x onerror="window.__pwned=1">' in text  # shown literally instead
    for tab in ("router", "attention", "lens", "reasoning"):
        page.click(f".oss-tab[data-tab='{tab}']")
        assert page.locator(f".oss-tab.active[data-tab='{tab}']").count() == 1
    assert view.errors == [] and view.blocked == []


def test_builtin_tool_calls_and_grammar_marks_are_drawn(offline, tmp_path):
    from ossscope.trace import ToolCall

    trace = synthetic_trace(T=20)
    trace.tool_calls = [ToolCall(name="python", arguments="print(4 * 32)", result="128\n", token_index=5)]
    trace.metadata["structured"] = {"enforced": True, "constrained": [t >= 14 for t in range(20)],
                                    "changed_top": [t in (14, 15) for t in range(20)], "problems": []}  # fmt: skip
    view = offline(trace.to_html(tmp_path / "tools.html"))
    page = view.page
    card = page.locator(".oss-role-tool")
    assert "PYTHON" in card.locator(".oss-msg-role").inner_text().upper()
    assert card.locator(".oss-tool-call").inner_text() == "print(4 * 32)" and "128" in card.inner_text()
    marked = page.locator(".oss-tok.oss-grammar-changed")
    assert [marked.nth(i).get_attribute("data-t") for i in range(marked.count())] == ["14", "15"]
    assert "(2 tokens)" in page.inner_text(".oss-grammar-key")
    page.click(".oss-tok[data-t='14']")
    page.mouse.move(0, 0)
    assert page.inner_text(".oss-grammar-chip") == "grammar changed top choice"
    assert view.errors == [] and view.blocked == []


def test_click_on_a_token_updates_its_panel(offline, tmp_path):
    trace = synthetic_trace(T=30, L=4, E=8, k=2, H=4)
    page = offline(trace.to_html(tmp_path / "t.html")).page
    assert page.locator(".oss-panel-title[data-token]").count() == 0
    page.click(".oss-tok[data-t='7']")
    page.mouse.move(0, 0)  # leave the tokens: the panel shows the pinned token, not the hovered one
    title = page.locator(".oss-panel-title[data-token]")
    assert title.get_attribute("data-token") == "7" and "Token 7 (pinned)" in title.inner_text()
    assert page.inner_text(".oss-token-big") == trace.token_texts[7]
    assert page.locator(".oss-router-row").count() == 4
    labels = page.locator(".oss-router-row").nth(2).locator(".oss-expert-label").all_inner_texts()
    order = trace.router_weights[7, 2].argsort(descending=True).tolist()
    assert [label.split()[0] for label in labels] == [f"E{int(trace.router_indices[7, 2, j])}" for j in order]
    page.hover(".oss-tok[data-t='12']")  # hovering previews another token
    assert page.locator(".oss-panel-title").get_attribute("data-token") == "12"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "export_reasoning.png"), full_page=True)


def test_metric_and_layer_choices_match_python(offline, tmp_path):
    trace = synthetic_trace(T=25, L=3, E=8, k=4, H=6, seed=4)
    page = offline(trace.to_html(tmp_path / "m.html")).page
    for metric, layer in (("entropy", "1"), ("sink", "all"), ("expert", "2"), ("sink", "0")):
        page.select_option("select[aria-label='Color by']", metric)
        page.select_option("select[aria-label='Layer']", layer)
        values = page.evaluate("window.__ossscopeViews[window.__ossscopeViews.length - 1].metricValues()")
        expected = W.token_metric(trace, metric, None if layer == "all" else int(layer)).tolist()
        assert values == pytest.approx(expected, abs=0.01), (metric, layer)
    page.select_option("select[aria-label='Channel']", "final")
    visible = page.locator(".oss-tok:not(.oss-hidden)").count()
    assert visible == trace.channels.count("final")


def test_a_1000_token_gpt_oss_20b_trace_opens_quickly(offline, tmp_path):
    from test_export import gpt_oss_20b_trace

    trace = gpt_oss_20b_trace()
    path = trace.to_html(tmp_path / "20b.html")
    started = time.perf_counter()
    view = offline(path)
    loaded = time.perf_counter() - started
    page = view.page
    page.click(".oss-tok[data-t='500']")
    for tab in ("router", "attention"):
        page.click(f".oss-tab[data-tab='{tab}']")
        page.wait_for_selector(".oss-main canvas")
    print(f"\n1,000-token gpt-oss-20b-shaped export: {path.stat().st_size / 1e6:.2f} MB, opened in {loaded:.2f} s")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "export_20b_attention.png"))
    assert view.errors == [] and view.blocked == [] and loaded < 15


def test_a_131k_token_trace_draws(offline, tmp_path):
    """gpt-oss's whole context: no argument-spreading helper overflows the stack, and the heatmaps stay within
    the largest canvas a browser draws (a wider one stays blank)."""
    T = 131_072
    trace = synthetic_trace(T=T, L=2, E=8, k=2, H=2, P=4)
    view = offline(trace.to_html(tmp_path / "long.html"))
    page = view.page
    assert page.locator(".oss-tok").count() == T
    for metric in ("sink", "entropy"):
        page.select_option("select[aria-label='Color by']", metric)
    for tab in ("router", "attention"):
        page.click(f".oss-tab[data-tab='{tab}']")
        page.wait_for_selector(".oss-main canvas")
        drawn = page.evaluate("""() => Array.from(document.querySelectorAll('.oss-main canvas'))
          .filter((c) => c.width > 1000).map((c) => {
            const px = c.getContext('2d').getImageData(Math.floor(c.width * 0.9), 3, 1, 1).data;
            return [c.width, px[3]];  // the canvas width, and the alpha of a cell near the last tokens
          })""")
        assert drawn and all(width <= 16384 and alpha > 0 for width, alpha in drawn), (tab, drawn)
    page.click(".oss-tab[data-tab='reasoning']")
    page.click(f".oss-tok[data-t='{T - 2}']")
    assert page.locator(".oss-panel-title").get_attribute("data-token") == str(T - 2)


def test_runs_side_by_side_with_verdicts_and_the_recorded_window(offline, tmp_path):
    runs = [synthetic_trace(T=20, seed=s) for s in range(3)]
    for trace, expected in zip(runs, ["nope", runs[1].final.strip(), "nope"], strict=True):
        trace.metadata.update(sliding_window=8, expected_final=expected)
    runs[2].metadata.pop("sliding_window")  # an older trace: the viewer must not invent a window
    path = W.export_trace_html(runs, tmp_path / "runs.html", titles=["low", "high", "ablated"])
    view = offline(path)
    page = view.page
    cards = page.locator(".oss-run")
    assert cards.count() == 3 and cards.nth(0).get_attribute("class") == "oss-run active"
    verdicts = [cards.nth(i).locator(".oss-check").get_attribute("data-correct") for i in range(3)]
    assert verdicts == ["false", "true", "false"] and "wrong (expected nope)" in cards.nth(0).inner_text()
    assert runs[1].final.strip() in cards.nth(1).inner_text()
    page.click(".oss-tab[data-tab='attention']")
    caption = page.locator(".oss-caption").first.inner_text()
    assert "last 8 keys" in caption and "128" not in caption
    cards.nth(2).click()
    assert "ablated" in page.inner_text(".oss-name") and "active" in page.locator(".oss-run").nth(2).get_attribute(
        "class")
    assert "a window of recent keys" in page.locator(".oss-caption").first.inner_text()
    assert view.errors == [] and view.blocked == []
