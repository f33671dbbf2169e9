"""%oss / %%oss in a real IPython shell: every subcommand, and the one-line errors for a user's mistakes."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch

import ossscope
from ossscope import tokenizer as tk

# IPython is imported inside the fixtures (as pyinstrument's magic tests do): a shell created at import time
# outlives the test session's output capture.


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random checkpoint with a compact vocabulary that holds the harmony special tokens, so chat
    prompts map to real model ids."""
    model = ossscope.random_model("tiny", seed=1)
    V = model.config.vocab_size
    specials = list(range(tk.START_OF_TEXT, tk.START_OF_TEXT + 21))  # <|startoftext|> .. <|call|> and a few more
    model.vocab_map = list(range(V - len(specials))) + specials
    model.unknown_id = 0
    return ossscope.write_checkpoint(model, tmp_path_factory.mktemp("tiny") / "tiny-ckpt")


@pytest.fixture(scope="module")
def session_ip():
    from IPython.testing.globalipapp import start_ipython

    return start_ipython()


@pytest.fixture
def ip(session_ip):
    session_ip.run_line_magic("load_ext", "ossscope")
    yield session_ip
    session_ip.run_line_magic("reset", "-f")


def run(ip, source: str):
    """Run a cell as a user would; return (stdout, stderr, display outputs, ExecutionResult)."""
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        result = ip.run_cell(source)
    return captured.stdout, captured.stderr, captured.outputs, result


def assert_one_line_error(ip, source: str, *expected: str) -> str:
    """The cell fails with a single `UsageError: ...` line naming the problem, and no traceback."""
    out, err, _, result = run(ip, source)
    text = (out + err).strip()
    assert not result.success
    assert "Traceback" not in text and "File \"" not in text, text
    assert text.startswith("UsageError: "), text
    assert len(text.splitlines()) == 1, text
    for fragment in expected:
        assert fragment in text, (fragment, text)
    return text


@pytest.fixture
def loaded(ip, checkpoint):
    _, err, _, result = run(ip, f"%oss load {checkpoint}")
    assert result.success, err
    return ip


# -- load ---------------------------------------------------------------------------------------------------


def test_load_binds_the_model_and_reports_it(ip, checkpoint):
    out, err, _, result = run(ip, f"%oss load {checkpoint} --dtype float32 --device cpu")
    assert result.success, err
    model = ip.user_ns["oss_model"]
    assert isinstance(model, ossscope.Model)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert "loaded tiny-ckpt as `oss_model`: 4 layers, 8 experts (top-2)" in out
    # The loaded weights are the checkpoint's: same logits as loading it directly.
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    torch.testing.assert_close(model(ids), ossscope.load(checkpoint, progress=False)(ids))


def test_load_dtype_flag(ip, checkpoint):
    _, err, _, result = run(ip, f"%oss load {checkpoint} --dtype bfloat16")
    assert result.success, err
    assert ip.user_ns["oss_model"].dtype == torch.bfloat16


def test_load_errors_are_one_line(ip, checkpoint, tmp_path):
    assert_one_line_error(ip, f"%oss load {tmp_path / 'nowhere'}", "%oss load:", "does not exist")
    assert_one_line_error(ip, f"%oss load {tmp_path}", "no config.json")
    assert_one_line_error(ip, f"%oss load {checkpoint} --dtype int8", "unknown dtype 'int8'")
    assert_one_line_error(ip, f"%oss load {checkpoint} --device nonsense", "--device 'nonsense' is not a device")
    if not torch.cuda.is_available():
        assert_one_line_error(ip, f"%oss load {checkpoint} --device cuda", "no CUDA GPU")
    assert_one_line_error(ip, f"%oss load {checkpoint} --colour red", "unrecognized arguments: --colour red")
    assert "oss_model" not in ip.user_ns


def test_load_of_a_damaged_checkpoint_names_the_file(ip, checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((checkpoint / "config.json").read_text())
    (broken / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes()[:1000])
    assert_one_line_error(ip, f"%oss load {broken}", "model.safetensors")


# -- general usage --------------------------------------------------------------------------------------------


def test_bare_oss_and_help_list_every_subcommand(ip):
    for source in ("%oss", "%oss help"):
        out, err, _, result = run(ip, source)
        assert result.success and not err
        for sub in ("%oss load", "%%oss chat", "%oss ablate", "%oss steer", "%oss trace", "%oss export", "%oss help"):
            assert sub in out, (sub, out)
    out, _, _, _ = run(ip, "%oss help ablate")
    assert "--mode {reroute,zero}" in out and "--clear" in out
    out, _, _, _ = run(ip, "%oss chat --help")
    assert "--max-new-tokens" in out and "--tools" in out


def test_user_mistakes_are_one_line(ip):
    assert_one_line_error(ip, "%oss bogus", "unknown subcommand 'bogus'")
    assert_one_line_error(ip, "%oss lod nano", "did you mean 'load'?")
    assert_one_line_error(ip, "%oss help bogus", "no subcommand 'bogus'")
    assert_one_line_error(ip, "%oss ablate 1:2", "no model loaded", "%oss load")
    assert_one_line_error(ip, "%oss steer", "no model loaded")
    assert_one_line_error(ip, "%%oss chat\nhello", "no model loaded")
    assert_one_line_error(ip, "%oss trace", "no trace yet")
    assert_one_line_error(ip, "%oss export out.html", "no trace yet")
    assert_one_line_error(ip, '%oss load "unclosed', "cannot split the line")
    assert_one_line_error(ip, "%%oss ablate 1:2\nsome body", "takes no cell body")
    ip.user_ns["oss_model"] = "not a model"
    assert_one_line_error(ip, "%oss ablate", "holds a str, not an ossscope model")


# -- ablate -------------------------------------------------------------------------------------------------


def test_ablate_sets_lists_and_clears(loaded):
    ip = loaded
    model = ip.user_ns["oss_model"]
    out, _, _, result = run(ip, "%oss ablate")
    assert result.success and out.strip() == "no experts ablated"

    out, err, _, result = run(ip, "%oss ablate 3:5,7 1:0 3:2 --mode zero")
    assert result.success, err
    assert model.active_ablation == {"mode": "zero", "experts": {1: [0], 3: [2, 5, 7]}}
    assert "layer 1: expert 0; layer 3: experts 2, 5, 7" in out and "(zero)" in out
    out, _, _, _ = run(ip, "%oss ablate")
    assert "layer 3: experts 2, 5, 7" in out

    # A new ablation replaces the old one (the default mode reroutes).
    run(ip, "%oss ablate 2:4")
    assert model.active_ablation == {"mode": "reroute", "experts": {2: [4]}}
    out, _, _, _ = run(ip, "%oss ablate --clear")
    assert model.active_ablation == {} and out.strip() == "no experts ablated"


def test_ablation_changes_what_the_model_computes(loaded):
    """The magic's ablation is the model's: logits with it equal logits under model.ablate(...)."""
    ip = loaded
    model = ip.user_ns["oss_model"]
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    clean, cache = model.run_with_cache(ids, names=lambda n: n.endswith("mlp.hook_topk_indices"))
    # Ablate experts these tokens really use (random ids may never route to a fixed choice of experts).
    first, second = cache["blocks.0.mlp.hook_topk_indices"][0, 0].tolist()
    third = int(cache["blocks.3.mlp.hook_topk_indices"][0, 0, 0])
    with model.ablate({0: [first, second], 3: [third]}, mode="reroute"):
        reference = model(ids)
    run(ip, f"%oss ablate 0:{first},{second} 3:{third}")
    torch.testing.assert_close(model(ids), reference)
    assert not torch.allclose(model(ids), clean)
    run(ip, "%oss ablate --clear")
    torch.testing.assert_close(model(ids), clean)


def test_ablate_errors_are_one_line(loaded):
    ip = loaded
    assert_one_line_error(ip, "%oss ablate 3", "cannot read '3'", "LAYER:EXPERT")
    assert_one_line_error(ip, "%oss ablate 3:x", "cannot read '3:x'")
    assert_one_line_error(ip, "%oss ablate 3:5,", "cannot read '3:5,'")
    assert_one_line_error(ip, "%oss ablate 9:1", "layer 9 is out of range", "0..3")
    assert_one_line_error(ip, "%oss ablate 1:8", "expert 8 (layer 1) is out of range", "0..7")
    assert_one_line_error(ip, "%oss ablate 1:2 --mode cut", "invalid choice: 'cut'")
    assert_one_line_error(ip, "%oss ablate 1:2 --clear", "--clear takes no L:E specs")
    assert ip.user_ns["oss_model"].active_ablation == {}  # nothing half-applied


# -- steer --------------------------------------------------------------------------------------------------


def test_steer_adds_the_named_vector_and_clears(loaded):
    ip = loaded
    model = ip.user_ns["oss_model"]
    D = model.config.hidden_size
    ip.user_ns["direction"] = torch.randn(D)
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    clean = model(ids)

    out, err, _, result = run(ip, "%oss steer 2 direction --scale -3")
    assert result.success, err
    assert "layer 2" in out
    torch.testing.assert_close(model.active_steering[2], -3 * ip.user_ns["direction"])
    # Same logits as adding the vector by hand with a hook after block 2.
    model.clear_steering()
    shift = [("blocks.2.hook_resid_post", lambda x, hook: x - 3 * ip.user_ns["direction"])]
    with model.hooks(shift):
        reference = model(ids)
    run(ip, "%oss steer 2 direction --scale -3")
    torch.testing.assert_close(model(ids), reference)

    out, _, _, _ = run(ip, "%oss steer")
    assert "layer 2" in out
    out, _, _, _ = run(ip, "%oss steer --clear")
    assert model.active_steering == {} and out.strip() == "no steering"
    torch.testing.assert_close(model(ids), clean)

    run(ip, "%oss steer 1 direction")
    run(ip, "%oss steer 3 direction")
    run(ip, "%oss steer --clear 1")
    assert sorted(model.active_steering) == [3]


def test_steer_errors_are_one_line(loaded):
    ip = loaded
    ip.user_ns["short"] = torch.randn(3)
    ip.user_ns["words"] = "hello"
    assert_one_line_error(ip, "%oss steer 1 missing_vector", "no variable named 'missing_vector'")
    assert_one_line_error(ip, "%oss steer 1 short", "must have shape (64,)")
    assert_one_line_error(ip, "%oss steer 1 words", "words")
    assert_one_line_error(ip, "%oss steer 1", "name the vector too")
    assert_one_line_error(ip, "%oss steer 7 short", "layer 7 is out of range")
    assert_one_line_error(ip, "%oss steer --clear 9", "layer 9 is out of range")
    assert_one_line_error(ip, "%oss steer one short", "invalid int value: 'one'")
    assert ip.user_ns["oss_model"].active_steering == {}


# -- chat, trace, export ----------------------------------------------------------------------------------------


def test_chat_cell_binds_the_trace_and_shows_the_dashboard(loaded):
    ip = loaded
    model = ip.user_ns["oss_model"]
    out, err, outputs, result = run(ip, "%%oss chat --reasoning high --max-new-tokens 12 --temperature 0\n"
                                        "What is 2+2?\n")
    assert result.success, err
    trace = ip.user_ns["_oss"]
    assert isinstance(trace, ossscope.Trace)
    assert trace.reasoning == "high" and 1 <= len(trace.tokens) <= 12
    assert trace.router_indices.shape == (len(trace.tokens), 4, 2)
    # Same tokens as calling chat directly with the same settings (greedy).
    direct = model.chat("What is 2+2?", reasoning="high", max_new_tokens=12, temperature=0)
    assert trace.tokens == direct.tokens and trace.prompt_tokens == direct.prompt_tokens
    # The live view, then the dashboard put in its place (widget views, so the display is a widget mimebundle).
    assert any("application/vnd.jupyter.widget-view+json" in o.data for o in outputs), outputs


def test_chat_flags_reach_the_model(loaded):
    ip = loaded
    model = ip.user_ns["oss_model"]
    run(ip, "%%oss chat --reasoning low --max-new-tokens 9 --temperature 0.8 --seed 5 --no-show\nHello there")
    sampled = ip.user_ns["_oss"]
    again = model.chat("Hello there", reasoning="low", max_new_tokens=9, temperature=0.8, seed=5)
    assert sampled.tokens == again.tokens and sampled.reasoning == "low"
    # The message can also follow the flags on the line.
    out, err, _, result = run(ip, "%oss chat --max-new-tokens 3 --temperature 0 --no-show Hello there")
    assert result.success, err
    assert "final:" in out and len(ip.user_ns["_oss"].tokens) <= 3


def test_chat_uses_the_active_ablation(loaded):
    ip = loaded
    model = ip.user_ns["oss_model"]
    run(ip, "%oss ablate 0:0,1,2,3 1:4,5 --mode reroute")
    run(ip, "%%oss chat --max-new-tokens 10 --temperature 0 --no-show\nWhat is 7 - 3?")
    trace = ip.user_ns["_oss"]
    assert not set(trace.router_indices[:, 0].flatten().tolist()) & {0, 1, 2, 3}
    assert not set(trace.router_indices[:, 1].flatten().tolist()) & {4, 5}
    run(ip, "%oss ablate --clear")
    with model.ablate({0: [0, 1, 2, 3], 1: [4, 5]}):
        reference = model.chat("What is 7 - 3?", max_new_tokens=10, temperature=0)
    assert trace.tokens == reference.tokens


def test_chat_tools_come_from_the_notebook(loaded):
    ip = loaded
    model = ip.user_ns["oss_model"]
    ip.run_cell("def get_weather(city: str) -> str:\n    '''Weather in a city.'''\n    return 'sunny'\n")
    run(ip, "%%oss chat --tools get_weather --max-new-tokens 6 --temperature 0 --no-show\nWeather in Paris?")
    trace = ip.user_ns["_oss"]
    # The tool is declared in the developer message, as chat(tools=[...]) renders it.
    reference = model.chat("Weather in Paris?", tools=[ip.user_ns["get_weather"]], max_new_tokens=6, temperature=0)
    assert trace.prompt_tokens == reference.prompt_tokens
    text = model.tokenizer.decode_o200k(trace.prompt_tokens)
    assert "get_weather" in text and "Weather in a city." in text


def test_chat_builtin_tools_browser_and_python(loaded, tmp_path):
    from ossscope.tools import Browser, Python

    ip = loaded
    (tmp_path / "notes.md").write_text("# Notes\n\nThe router picks 4 experts.\n")
    run(ip, f"%%oss chat --browser {tmp_path} --python --max-new-tokens 4 --temperature 0 --no-show\nHow many?")
    trace = ip.user_ns["_oss"]
    assert trace.metadata["builtin_tools"] == ["browser", "python"]
    text = ip.user_ns["oss_model"].tokenizer.decode_o200k(trace.prompt_tokens)
    assert "## browser" in text and "## python" in text and "namespace functions" not in text
    kernel = ip.user_ns["oss_python"]
    assert isinstance(kernel, Python) and kernel._manager is None  # made for the chat, started only when called
    # A Browser in the notebook can be named instead of a folder; the kernel is reused.
    ip.user_ns["notes"] = Browser(tmp_path)
    run(ip, "%%oss chat --browser notes --python --max-new-tokens 2 --temperature 0 --no-show\nHi")
    assert ip.user_ns["oss_python"] is kernel and ip.user_ns["_oss"].metadata["builtin_tools"] == ["browser", "python"]
    assert_one_line_error(ip, f"%%oss chat --browser {tmp_path / 'nowhere'}\nhi", "--browser", "is not a folder")


def test_chat_errors_are_one_line(loaded):
    ip = loaded
    ip.user_ns["not_a_function"] = 3
    assert_one_line_error(ip, "%%oss chat\n   \n", "no message")
    assert_one_line_error(ip, "%%oss chat --tools nowhere\nhi", "no such function", "'nowhere'")
    assert_one_line_error(ip, "%%oss chat --tools not_a_function\nhi", "not a function")
    assert_one_line_error(ip, "%%oss chat --tools ,\nhi", "--tools needs function names")
    assert_one_line_error(ip, "%%oss chat --reasoning extreme\nhi", "invalid choice: 'extreme'")
    assert_one_line_error(ip, "%%oss chat --max-new-tokens many\nhi", "invalid int value: 'many'")
    assert_one_line_error(ip, "%%oss chat --max-new-tokens -1\nhi", "must be at least 1")
    assert_one_line_error(ip, "%%oss chat --temperature\nhi", "expected one argument")
    assert_one_line_error(ip, "%%oss chat extra words\nhi", "either in the cell body or on the line")
    assert "_oss" not in ip.user_ns


def test_trace_and_export(loaded, tmp_path):
    ip = loaded
    run(ip, "%%oss chat --max-new-tokens 8 --temperature 0 --no-show\nSay <b>hi</b>")
    trace = ip.user_ns["_oss"]
    out, err, outputs, result = run(ip, "%oss trace")
    assert result.success, err
    assert any("application/vnd.jupyter.widget-view+json" in o.data for o in outputs)

    target = tmp_path / "run.html"
    out, err, _, result = run(ip, f"%oss export {target}")
    assert result.success, err
    assert target.is_file() and f"wrote {target}" in out
    page = target.read_text()
    assert page.lstrip().lower().startswith("<!doctype html") and "<b>hi</b>" not in page  # escaped
    # The same file trace.to_html writes.
    reference = trace.to_html(tmp_path / "reference.html").read_text()
    assert len(page) == len(reference)


def test_export_errors_are_one_line(loaded, tmp_path):
    ip = loaded
    run(ip, "%%oss chat --max-new-tokens 2 --temperature 0 --no-show\nhi")
    assert_one_line_error(ip, f"%oss export {tmp_path / 'run.txt'}", "ending in .html")
    assert_one_line_error(ip, f"%oss export {tmp_path / 'missing' / 'run.html'}", "does not exist")
    assert_one_line_error(ip, "%oss export", "the following arguments are required: PATH.html")
    ip.user_ns["_oss"] = "something else"
    assert_one_line_error(ip, f"%oss export {tmp_path / 'run.html'}", "no trace yet")


def test_chat_cell_runs_on_the_models_engine(loaded):
    """%%oss chat goes through `model.engine`: one engine step per generated token."""
    from ossscope.engine import TorchEngine

    ip = loaded
    model = ip.user_ns["oss_model"]
    previous = model.engine
    model.engine = TorchEngine(model)
    try:
        _, err, _, result = run(ip, "%%oss chat --max-new-tokens 7 --temperature 0 --no-show\nWhat is 2+2?")
        assert result.success, err
        assert model.engine.steps == len(ip.user_ns["_oss"].tokens) >= 1
    finally:
        model.engine = previous


def test_load_engine_flag(ip, checkpoint):
    _, err, _, result = run(ip, f"%oss load {checkpoint} --engine torch")
    assert result.success, err
    assert ip.user_ns["oss_model"].engine.name == "torch"
    assert_one_line_error(ip, f"%oss load {checkpoint} --engine warp", "invalid choice")


# -- hostile input: sent as typed, long lines, one line per mistake ------------------------------------------


def test_a_failed_oss_ablate_keeps_the_active_one(loaded):
    ip = loaded
    model = ip.user_ns["oss_model"]
    run(ip, "%oss ablate 1:2 --mode zero")
    assert_one_line_error(ip, "%oss ablate 0:0,1,2,3,4,5,6", "cannot reroute 7 of 8 experts of layer 0")
    assert model.active_ablation == {"mode": "zero", "experts": {1: [2]}}
    assert bool(model.blocks[1].mlp.zero_mask[2]) and model.blocks[1].mlp.zeroing


def test_a_chat_message_is_sent_as_typed(loaded):
    ip = loaded
    ip.user_ns["x"] = "EXPANDED"
    out, err, _, result = run(ip, "%oss chat --max-new-tokens 1 --temperature 0 --no-show costs $x or {1+1} or {x}")
    assert result.success, err
    user = [m["content"] for m in ip.user_ns["_oss"].messages if m.get("role") == "user"]
    assert user == ["costs $x or {1+1} or {x}"]
    out, err, _, result = run(ip, "%%oss chat --max-new-tokens 1 --temperature 0 --no-show --developer $x\nhi {x}")
    assert result.success, err
    developer = [m["content"] for m in ip.user_ns["_oss"].messages if m.get("role") == "developer"]
    assert developer and "$x" in str(developer[0]) and "EXPANDED" not in str(developer[0])


def test_a_100k_character_line_is_not_quadratic(ip):
    """IPython's $-expansion took ~40 s on a 100k-character line; without it the line is split in well under 1 s."""
    for word in ("x", "word "):
        line = "%oss chat " + (word * (100_000 // len(word)))
        started = time.perf_counter()
        assert_one_line_error(ip, line, "no model loaded")
        assert time.perf_counter() - started < 5


def test_every_chat_mistake_is_one_line(loaded, tmp_path):
    ip = loaded
    ip.run_cell("shout = lambda text: text.upper()")
    assert_one_line_error(ip, "%%oss chat --max-new-tokens 0\nhi", "--max-new-tokens must be at least 1, got 0")
    assert_one_line_error(ip, "%%oss chat --temperature nan\nhi", "--temperature must be a finite number >= 0")
    assert_one_line_error(ip, "%%oss chat --temperature inf\nhi", "--temperature must be a finite number >= 0")
    assert_one_line_error(ip, "%%oss chat --temperature -0.5\nhi", "got -0.5")
    assert_one_line_error(ip, "%%oss chat --seed 123456789012345678901234567890\nhi",
                          "--seed must be in 0..2**63-1, got 123456789012... (30 digits)")
    assert_one_line_error(ip, "%%oss chat --tools shout\nhi", "--tools shout is a lambda", "def shout(")
    assert_one_line_error(ip, "%%oss chat --bogus 3\nhi", "unrecognized arguments: --bogus")
    assert_one_line_error(ip, "%oss ablate 1:2 --bogus", "unrecognized arguments: --bogus")
    assert_one_line_error(ip, "%oss chat What's 2+2?", "No closing quotation", "goes in the cell body")
    assert "_oss" not in ip.user_ns


def test_export_onto_a_folder_is_one_line(loaded, tmp_path):
    ip = loaded
    run(ip, "%%oss chat --max-new-tokens 2 --temperature 0 --no-show\nhi")
    (tmp_path / "trace.html").mkdir()
    assert_one_line_error(ip, f"%oss export {tmp_path / 'trace.html'}", "is a folder")
    assert_one_line_error(ip, f"%oss export {tmp_path / 'run.html'} --bogus", "unrecognized arguments")


def test_loading_a_checkpoint_with_a_bad_config_is_one_line(ip, checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "config.json").read_text())
    for field, value, fragment in [("num_key_value_heads", 0, "num_key_value_heads must be in 1..1024, got 0"),
                                   ("num_hidden_layers", math.inf, "num_hidden_layers must be a finite number"),
                                   ("hidden_size", 10**400, "hidden_size must be in 32..131072")]:
        (broken / "config.json").write_text(json.dumps({**config, field: value}))
        assert_one_line_error(ip, f"%oss load {broken}", "%oss load:", fragment)
    assert "oss_model" not in ip.user_ns


def test_load_out_of_memory_is_one_line(ip, monkeypatch):
    from ossscope import loading

    def too_big(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(loading, "load", too_big)
    assert_one_line_error(ip, "%oss load nano", "not enough memory for nano", "you tried to allocate 4398046511104")
    monkeypatch.setattr(loading, "load", lambda *a, **k: 1 / 0)  # a bug keeps its traceback
    _, _, _, result = run(ip, "%oss load nano")
    assert isinstance(result.error_in_exec, ZeroDivisionError)


def test_steering_with_nan_is_one_line_and_keeps_the_old_vector(loaded):
    ip = loaded
    model = ip.user_ns["oss_model"]
    D = model.config.hidden_size
    ip.user_ns["good"], ip.user_ns["bad"] = torch.ones(D), torch.full((D,), math.nan)
    run(ip, "%oss steer 1 good --scale 2")
    before = model.active_steering[1]
    assert_one_line_error(ip, "%oss steer 1 bad", "%oss steer: bad:", "holds NaN or Inf")
    assert_one_line_error(ip, "%oss steer 1 good --scale nan", "scale must be a finite number, got nan")
    assert_one_line_error(ip, "%oss steer 1 good --scale inf", "scale must be a finite number, got inf")
    assert model.active_steering[1] is before
