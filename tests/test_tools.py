"""harmony's built-in tools: the system message byte for byte against openai-harmony, the browser over a local
corpus (search ranking, the reference display, links, scrolling, find, citations, misuse), the python kernel
(state, tracebacks, timeout, crash, output cut, sandbox), and both driven through chat's tool loop."""

from __future__ import annotations

import json
import socket

import pytest
from test_chat import ScriptedModel

import ossscope
from ossscope import harmony
from ossscope import tokenizer as tk
from ossscope.chat import chat
from ossscope.config import PRESETS
from ossscope.tools import Browser, Document, Python, ToolUsageError, split_tools

DOCS = [
    Document("moe.md", "Mixture of experts", "gpt-oss routes each token to 4 of 32 experts.\nThe router is linear."),
    Document("sinks.md", "Attention sinks", "Every head has a learned sink.\nThe sink soaks up attention mass."),
    Document("rope.md", "Rotary embeddings", "Positions are rotations (RoPE) with YaRN scaling.\n" * 30),
]


@pytest.fixture(scope="module")
def kernel():
    with Python(timeout=3.0, max_output_chars=200) as tool:
        yield tool


def enc():
    return tk.harmony_encoding()


# -- the declaration ------------------------------------------------------------------------------------------


def _harmony_prompt(system) -> list[int]:
    from openai_harmony import Conversation, Message, Role

    messages = [Message.from_role_and_content(Role.SYSTEM, system), Message.from_role_and_content(Role.USER, "hi")]
    return list(enc().render_conversation_for_completion(Conversation.from_messages(messages), Role.ASSISTANT))


def _system(effort="medium"):
    from openai_harmony import SystemContent

    return SystemContent.new().with_reasoning_effort(harmony._effort(effort))


def test_system_message_is_harmonys_byte_for_byte():
    # Given in either order, the tools are declared as harmony's with_browser_tool().with_python_tool() does.
    expected = _harmony_prompt(_system().with_browser_tool().with_python_tool())
    builtins, _ = split_tools([Python(), Browser(DOCS)])
    ours = harmony.render_prompt("hi", builtin_tools=harmony_configs(builtins))
    assert ours == expected
    text = enc().decode(ours)
    assert "## browser\n\n// Tool for browsing." in text and "namespace browser {" in text
    assert "type search = (_: {" in text and "type open = (_: {" in text and "type find = (_: {" in text
    assert "## python\n\nUse this tool to execute Python code" in text
    assert _harmony_prompt(_system().with_python_tool()) == harmony.render_prompt("hi", builtin_tools=[Python()])


def harmony_configs(builtins):
    from ossscope.tools.base import tool_configs

    return tool_configs(builtins)


def test_declared_source_and_timeout_follow_the_tool():
    from openai_harmony import ToolNamespaceConfig

    browser = ToolNamespaceConfig.browser()
    browser.description = browser.description.replace("sources=web (default: web)", "sources=lab-notes")
    python = ToolNamespaceConfig.python()
    python.description = python.description.replace("after 120.0 seconds", "after 5.0 seconds")
    expected = _harmony_prompt(_system().with_tools(browser).with_tools(python))
    ours = harmony.render_prompt("hi", builtin_tools=[Browser(DOCS, source="lab-notes"), Python(timeout=5)])
    assert ours == expected
    assert "sources=lab-notes\nnamespace browser" in enc().decode(ours)
    # The declared timeout can differ from the enforced one: harmony's 120 s shown, 5 s enforced.
    shown = Python(timeout=5, declared_timeout=120.0)
    assert shown.timeout == 5.0 and harmony.render_prompt("hi", builtin_tools=[shown]) == _harmony_prompt(
        _system().with_python_tool()
    )
    assert harmony.render_prompt("hi", builtin_tools=[Python(timeout=120, declared_timeout=5)]) == _harmony_prompt(
        _system().with_tools(python)
    )


def test_tool_answers_render_like_harmony():
    from openai_harmony import Author, Message, Role

    for name, channel in (("browser.search", "analysis"), ("python", "analysis"), ("get_weather", "commentary")):
        full = name if name != "get_weather" else "functions.get_weather"
        message = Message.from_author_and_content(Author.new(Role.TOOL, full), "RESULT")
        message = message.with_channel(channel).with_recipient("assistant")
        expected = list(enc().render(message)) + [tk.START] + enc().encode("assistant", allowed_special=set())
        assert harmony.render_tool_result(name, "RESULT", channel) == expected


# -- the browser ----------------------------------------------------------------------------------------------


def test_search_ranks_and_renders_the_reference_display():
    browser = Browser(DOCS)
    shown = browser.search("how many experts does the router use")
    assert shown == (
        "[0] how many experts does the router use\n"
        "**viewing lines [0 - 5] of 5**\n\n"
        "L0: # Search Results\n"
        "L1: \n"
        "L2: * 【0†Mixture of experts†moe.md】 gpt-oss routes each token to 4 of 32 experts. \n"
        "L3: The router is linear.\n"
        "L4: * 【1†Attention sinks†sinks.md】 Every head has a learned sink. The sink soaks up \n"
        "L5: attention mass."
    )  # the best match first (BM25); "the" alone matches the second
    assert browser.pages[0].links == {"0": "moe.md", "1": "sinks.md"}
    assert "No results for `zebra`." in browser.search("zebra")
    assert browser.cursor == 1


def test_open_link_scroll_find_and_cite():
    browser = Browser(DOCS, view_tokens=60)
    browser.search("sink attention")
    page = browser.open(id=0)
    assert page.startswith("[1] Attention sinks (sinks.md)\n**viewing lines [0 - 1] of 1**\n\n")
    assert page.endswith("L0: Every head has a learned sink.\nL1: The sink soaks up attention mass.")
    long = browser.open(id="rope.md")
    header = long.split("\n")[1]
    assert header.startswith("**viewing lines [0 - ") and header.endswith("] of 30**")
    shown = int(header.split(" - ")[1].split("]")[0])
    assert 3 <= shown < 30  # cut by the token budget, not the whole page
    scrolled = browser.open(loc=10, num_lines=3)
    assert scrolled.startswith("[3] Rotary embeddings (rope.md)\n**viewing lines [10 - 12] of 30**\n\nL10: ")
    found = browser.find("sink", cursor=1)
    assert found.startswith("[4] Find results for text: `sink` in `Attention sinks` (sinks.md/find?pattern=sink)")
    expected = "L0: # 【0†match at L0】\nL1: Every head has a learned sink.\nL2: The sink soaks up attention mass."
    assert found.endswith(expected)
    assert "No `find` results for pattern: `zebra`" in browser.find("zebra", cursor=3)
    cited = browser.citations("A head keeps a sink 【1†L0-L1】, see 【7†L2】.")
    assert cited[0]["valid"] and cited[0]["url"] == "sinks.md" and cited[0]["lines"][0].startswith("Every head")
    assert not cited[1]["valid"]


@pytest.mark.parametrize(
    ("function", "arguments", "message"),
    [
        ("open", {"id": 5}, "Invalid link id `5`."),
        ("open", {"cursor": 9}, "Cursor `9` is out of range"),
        ("open", {"id": "nowhere.md"}, "no document at `nowhere.md`"),
        ("open", {"loc": 99}, "Invalid location parameter: `99`"),
        ("find", {"pattern": "x"}, "Cannot run `find` on search results page"),
        ("search", {"query": "  "}, "`query` must be a non-empty string"),
        ("open", {"cursor": "first"}, "`cursor` should be an integer"),
    ],
)
def test_browser_misuse_is_a_clear_usage_error(function, arguments, message):
    browser = Browser(DOCS)
    browser.search("experts")
    with pytest.raises(ToolUsageError, match=message.replace("`", ".").replace("[", ".").replace("(", ".")):
        browser.call(function, arguments)


def test_folder_corpus_reads_markdown_and_html(tmp_path):
    (tmp_path / "a.md").write_text("# Harmony\n\nThe chat format of gpt-oss.\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.html").write_text(
        "<html><head><title>Kernels</title><style>p{}</style></head><body><h1>MXFP4</h1>"
        "<p>Experts are stored in &amp; MXFP4.</p><script>x()</script></body></html>"
    )
    (tmp_path / "skip.bin").write_bytes(b"\0")
    browser = Browser(tmp_path)
    assert [d.url for d in browser.documents] == ["a.md", "sub/b.html"]
    html_doc = browser.by_url["sub/b.html"]
    assert html_doc.title == "Kernels" and html_doc.text == "# MXFP4\n\nExperts are stored in & MXFP4."
    assert "【0†Kernels†sub/b.html】" in browser.search("mxfp4 experts")
    with pytest.raises(ValueError, match="is not a folder"):
        Browser(tmp_path / "missing")
    with pytest.raises(ValueError, match="share the url"):
        Browser([Document("x", "a", "b"), Document("x", "c", "d")])
    with pytest.raises(ValueError, match="corpus item 0 is int"):
        Browser([3])


# -- the python kernel ----------------------------------------------------------------------------------------


def test_kernel_keeps_state_and_answers_tracebacks(kernel):
    assert kernel.run("x = 6 * 7\nprint('ready')\nx") == "ready\n42\n"
    assert kernel.run("x + 1") == "43\n"
    error = kernel.run("1 / 0")
    assert error.startswith("Traceback (most recent call last):") and "\x1b[" not in error
    assert error.endswith("ZeroDivisionError: division by zero\n")
    cut = kernel.run("print('y' * 1000)")
    assert len(cut) == 200 and cut.endswith("y...")


def test_kernel_timeout_interrupts_and_keeps_state(kernel):
    kernel.run("kept = 'yes'")
    with pytest.raises(ToolUsageError, match=r"timed out after 3.0 seconds; it was interrupted .*\nstarted"):
        kernel.run("import time\nprint('started', flush=True)\ntime.sleep(30)")
    assert kernel.run("kept") == "'yes'\n"


def test_kernel_crash_restarts_with_fresh_state(kernel):
    kernel.run("lost = 1")
    restarts = kernel.restarts
    with pytest.raises(ToolUsageError, match="the Python kernel died"):
        kernel.run("import os\nos._exit(3)")
    assert kernel.restarts == restarts + 1
    assert "NameError" in kernel.run("lost")


def test_kernel_sandbox_where_the_os_allows(kernel):
    kernel.start()
    if kernel.sandbox.get("memory_limit"):
        assert "MemoryError" in kernel.run("block = bytearray(8 * 2**30)")
    if not kernel.sandbox.get("no_network"):
        pytest.skip("this OS does not let the kernel leave the network")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        answer = kernel.run(
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "    print('connected')\nexcept OSError as e:\n    print('refused', type(e).__name__)"
        )
    finally:
        server.close()
    assert answer.startswith("refused")


def test_bad_tool_settings_are_refused():
    with pytest.raises(ValueError, match="timeout must be positive"):
        Python(timeout=0)
    with pytest.raises(ValueError, match="declared_timeout must be positive"):
        Python(declared_timeout=-1)
    with pytest.raises(ValueError, match="below the 64 MiB"):
        Python(memory_limit=1000)
    with pytest.raises(ValueError, match="two built-in tools named 'browser'"):
        split_tools([Browser(DOCS), Browser(DOCS)])
    with pytest.raises(ValueError, match="no Jupyter kernel named 'no-such-kernel'"):
        Python(kernel_name="no-such-kernel")


def test_a_missing_jupyter_client_is_refused_before_any_chat(monkeypatch):
    """The GPU image lacks jupyter_client: the tool must say so when built, not tell the model at its first call."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jupyter_client" else real(name, *a))
    with pytest.raises(ImportError, match="needs jupyter_client and ipykernel"):
        Python()


# -- through chat's tool loop ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return ossscope.random_model(PRESETS["tiny"].replace(vocab_size=201_088), seed=2, device="cpu")


def test_chat_dispatches_browser_and_python(model, kernel):
    script = (
        "<|channel|>analysis<|message|>Search.<|end|><|start|>assistant"
        '<|channel|>analysis to=browser.search code<|message|>{"query": "experts router"}<|call|>'
        '<|channel|>analysis to=browser.open code<|message|>{"id": 0}<|call|>'
        '<|channel|>analysis to=browser.open code<|message|>{"id": 9}<|call|>'
        "<|channel|>analysis to=python code<|message|>print(4 * 32)<|call|>"
        "<|channel|>final<|message|>4 of 32 【1†L0】.<|return|>"
    )
    scripted = ScriptedModel(model, script)
    browser = Browser(DOCS)
    trace = chat(scripted, "How many experts?", tools=[browser, kernel], temperature=0.0, max_new_tokens=200)
    assert trace.metadata["stop_reason"] == "return" and trace.final == "4 of 32 【1†L0】."
    names = [c.name for c in trace.tool_calls]
    assert names == ["browser.search", "browser.open", "browser.open", "python"]
    search, opened, bad, code = trace.tool_calls
    assert search.parsed_arguments == {"query": "experts router"} and search.result.startswith("[0] experts router")
    assert opened.result.startswith("[1] Mixture of experts (moe.md)") and opened.error is None
    assert bad.error == "Invalid link id `9`." and bad.result is None
    assert code.parsed_arguments == {"code": "print(4 * 32)"} and code.result == "128\n"
    assert browser.citations(trace.final)[0]["url"] == "moe.md"
    sequence, _ = trace.context_tokens()
    context = enc().decode(sequence)
    assert "## browser" in context and "## python" in context
    assert "<|start|>browser.search to=assistant<|channel|>analysis<|message|>[0] experts router" in context
    assert "<|start|>python to=assistant<|channel|>analysis<|message|>128\n<|end|>" in context
    assert '<|start|>browser.open to=assistant<|channel|>analysis<|message|>{"error": "Invalid link id' in context
    tools = [m for m in trace.messages if m["role"] == "tool"]
    assert [m["name"] for m in tools] == names and {m["channel"] for m in tools} == {"analysis"}
    assert trace.metadata["builtin_tools"] == ["browser", "python"]
    # A call to a built-in tool that was not given says what is available.
    script = "<|channel|>analysis to=python code<|message|>1<|call|><|channel|>final<|message|>x<|return|>"
    stray = ScriptedModel(model, script)
    lone = chat(stray, "hi", tools=[browser], temperature=0.0, max_new_tokens=60)
    assert lone.tool_calls[0].error == "unknown tool 'python'; available tools: browser"
    assert json.loads(json.dumps(lone.metadata))["builtin_tools"] == ["browser"]


def test_a_built_in_answer_the_encoder_refuses_is_told_to_the_model(model, monkeypatch):
    """A built-in tool's answer over the encoder's bound is an error answered to the model, not a crash."""
    from ossscope import encode

    browser = Browser(DOCS)
    monkeypatch.setattr(browser, "call", lambda function, args: "x" * (encode.MAX_TEXT_CHARS + 1))
    script = ('<|channel|>analysis to=browser.search code<|message|>{"query": "experts"}<|call|>'
              "<|channel|>final<|message|>ok<|return|>")
    trace = chat(ScriptedModel(model, script), "hi", tools=[browser], temperature=0.0, max_new_tokens=80)
    (call,) = trace.tool_calls
    assert call.result is None and call.error.startswith("the tool's answer cannot be read")
    assert trace.final == "ok" and trace.metadata["stop_reason"] == "return"
