"""Hostile input and concurrency: bad weights and configs are refused at load naming the tensor or field, a
failed ablation or steering keeps the old one, the Lab runs one run at a time and keeps what the user set during
a run. (The %oss side, one-line errors and no $-expansion, is in test_magics.py.)"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time

import ossscope.widgets as W
import pytest
import torch
from _widget_fixtures import synthetic_trace
from safetensors.torch import load_file, save_file
from test_widgets import ScriptedStream, _fake_model

import ossscope
from ossscope import loading
from ossscope.loading import CheckpointError


def _copy(tmp_path, source, name="ckpt"):
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def _edit_tensor(path, file_name, tensor_name, edit):
    file = path / file_name
    tensors = load_file(str(file))
    edit(tensors[tensor_name])
    save_file(tensors, str(file))


def _shard_of(path, tensor_name):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][tensor_name]


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if load() builds a Model: the config (or index) must be refused before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was allocated before the bad input was found")

    monkeypatch.setattr(loading, "Model", refuse)


# -- weight values: NaN/Inf floats and NaN MXFP4 scales -------------------------------------------------------------


@pytest.mark.parametrize("layout, tensor, value, fragment", [
    ("original", "block.1.attn.qkv.weight", math.nan, "1 NaN and 0 Inf"),
    ("original", "embedding.weight", -math.inf, "0 NaN and 1 Inf"),
    ("original", "block.3.mlp.mlp2_bias", math.nan, "1 NaN"),
    ("hf", "model.layers.2.self_attn.k_proj.weight", math.inf, "0 NaN and 1 Inf"),  # a third of a fused tensor
    ("hf", "model.layers.0.post_attention_layernorm.weight", math.nan, "1 NaN"),
])
def test_a_nan_or_inf_weight_is_refused_naming_the_tensor(tmp_path, tiny_checkpoints, layout, tensor, value,
                                                          fragment):
    path = _copy(tmp_path, tiny_checkpoints[layout])
    file = "model.safetensors" if layout == "original" else _shard_of(path, tensor)
    _edit_tensor(path, file, tensor, lambda t: t.view(-1).__setitem__(7, value))
    with pytest.raises(CheckpointError, match=rf"{file}: tensor {tensor} holds {fragment}") as info:
        ossscope.load(path, device="cpu", progress=False)
    assert "NaN logits" in str(info.value)


def test_mxfp4_scale_byte_255_is_refused_naming_the_tensor(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    _edit_tensor(path, "model.safetensors", "block.2.mlp.mlp1_weight.scales",
                 lambda t: (t[3, 5, 0].fill_(255), t[6, 0, 1].fill_(255)))
    with pytest.raises(CheckpointError, match=r"tensor block\.2\.mlp\.mlp1_weight\.scales holds 2 scale byte\(s\) "
                                              r"of 255, which is NaN in MXFP4's E8M0 scales \(first at index "
                                              r"\(3, 5, 0\)\)"):
        ossscope.load(path, device="cpu", progress=False)
    # The largest real exponent (254) is a valid scale: only 255 is refused.
    _edit_tensor(path, "model.safetensors", "block.2.mlp.mlp1_weight.scales",
                 lambda t: t.masked_fill_(t == 255, 254))
    ossscope.load(path, device="cpu", progress=False)


def test_finite_weights_that_overflow_float16_say_so(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    _edit_tensor(path, "model.safetensors", "block.0.attn.out.bias", lambda t: t.__setitem__(2, 1e6))
    ossscope.load(path, device="cpu", dtype="float32", progress=False)  # fine where it fits
    with pytest.raises(CheckpointError, match=r"block\.0\.attn\.out\.bias .* finite but overflow float16"):
        ossscope.load(path, device="cpu", dtype="float16", progress=False)


# -- config values and the index, before allocating -----------------------------------------------------------------


@pytest.mark.parametrize("field, value, fragment", [
    ("num_key_value_heads", 0, "num_key_value_heads must be in 1..1024, got 0"),
    ("hidden_size", 1e300, "hidden_size must be in 32..131072, got 100000000000... (301 digits)"),
    ("vocab_size", 10**400, "vocab_size must be in 1..16777216, got 100000000000... (401 digits)"),
    ("num_hidden_layers", math.inf, "num_hidden_layers must be a finite number, got inf"),
    ("rope_theta", math.nan, "rope_theta must be a finite number, got nan"),
    ("rope_theta", 1.0, "rope_theta must be a finite number above 1"),
    ("rope_scaling_factor", -2.0, "rope_scaling_factor must be a finite number above 0, got -2.0"),
    ("rope_ntk_beta", 0, "rope_ntk_beta must be a finite number above 0"),
    ("swiglu_limit", -math.inf, "swiglu_limit must be a finite number, got -inf"),
    ("num_attention_heads", 3, "num_attention_heads (3) must be a multiple of num_key_value_heads (2)"),
    ("head_dim", "64", "head_dim must be a number, got '64'"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else str(v)[:12])
def test_a_bad_config_value_is_named_before_allocating(tmp_path, tiny_checkpoints, no_allocation, field, value,
                                                       fragment):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))  # json writes NaN / Infinity, as a hostile file may
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        ossscope.load(path, device="cpu", progress=False)


@pytest.mark.parametrize("edit, fragment", [
    (lambda c: c.__setitem__("rms_norm_eps", 0), "rms_norm_eps must be a finite number above 0, got 0.0"),
    (lambda c: c.__setitem__("rope_scaling", [1, 2]), "rope_scaling must be an object"),
    (lambda c: c.__setitem__("layer_types", "sliding_attention"), "layer_types must be a list"),
    (lambda c: c["rope_scaling"].__setitem__("beta_slow", -1.0), "rope_ntk_alpha must be a finite number above 0"),
], ids=["rms_norm_eps", "rope_scaling", "layer_types", "beta_slow"])
def test_a_bad_hf_config_value_is_named_before_allocating(tmp_path, tiny_checkpoints, no_allocation, edit,
                                                          fragment):
    path = _copy(tmp_path, tiny_checkpoints["hf"])
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters")
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=re.escape(fragment)):
        ossscope.load(path, device="cpu", progress=False)


def test_a_config_value_out_of_range_in_python_is_a_value_error():
    with pytest.raises(ValueError, match="num_key_value_heads must be in 1..1024, got 0"):
        ossscope.PRESETS["tiny"].replace(num_key_value_heads=0)
    with pytest.raises(ValueError, match="rms_norm_eps must be a finite number above 0, got nan"):
        ossscope.PRESETS["tiny"].replace(rms_norm_eps=math.nan)


def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, tiny_checkpoints, no_allocation):
    path = _copy(tmp_path, tiny_checkpoints["hf"], "repo/ckpt")
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    shutil.copy(path / shard, tmp_path / "repo" / "elsewhere.safetensors")  # a real file: the old code read it
    for hostile in ("../elsewhere.safetensors", str(tmp_path / "repo" / "elsewhere.safetensors")):
        index["weight_map"][name] = hostile
        index_file.write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match=rf"weight_map\['{re.escape(name)}'\] = .* leaves the checkpoint"):
            ossscope.load(path, device="cpu", progress=False)
    index["weight_map"][name] = 7
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="must be a shard file name, got 7"):
        ossscope.load(path, device="cpu", progress=False)
    index_file.write_text(json.dumps([index]))
    with pytest.raises(CheckpointError, match="index.json must hold a JSON object, got list"):
        ossscope.load(path, device="cpu", progress=False)



# -- vocab_map.json: every id checked at load, before allocating ----------------------------------------------------


def _with_vocab_map(tmp_path, tiny_checkpoints, edit):
    """A copy of the tiny checkpoint (vocab 512) with a compact vocabulary map, edited; returns (folder, file)."""
    path = _copy(tmp_path, tiny_checkpoints["original"])
    vocab = {"o200k_ids": list(range(100, 611)) + [200004], "unknown_id": 511}
    edit(vocab)
    file = path / "vocab_map.json"
    file.write_text(json.dumps(vocab))
    return path, file


def test_a_good_vocab_map_loads(tmp_path, tiny_checkpoints):
    path, _ = _with_vocab_map(tmp_path, tiny_checkpoints, lambda v: None)
    model = ossscope.load(path, device="cpu", progress=False)
    assert model.vocab_map[:2] == [100, 101] and model.unknown_id == 511


@pytest.mark.parametrize("edit, fragment", [
    (lambda v: v["o200k_ids"].__setitem__(3, 201_088),
     "o200k_ids[3] = 201088 is outside the o200k_harmony vocabulary (0..201087)"),
    (lambda v: v["o200k_ids"].__setitem__(0, -1), "o200k_ids[0] = -1 is outside the o200k_harmony vocabulary"),
    (lambda v: v["o200k_ids"].__setitem__(5, 102), "o200k_ids[5] = 102 repeats o200k_ids[2]"),
    (lambda v: v["o200k_ids"].__setitem__(7, 107.0), "o200k_ids[7] = 107.0 is not an integer"),
    (lambda v: v["o200k_ids"].__setitem__(8, "108"), "o200k_ids[8] = '108' is not an integer"),
    (lambda v: v["o200k_ids"].__setitem__(9, True), "o200k_ids[9] = True is not an integer"),
    (lambda v: v["o200k_ids"].__setitem__(10, "x" * 1000), "o200k_ids[10] = 'xxxxxxxxx"),
    (lambda v: v["o200k_ids"].pop(), "maps 511 ids but config.json says vocab_size=512"),
    (lambda v: v.__setitem__("o200k_ids", {"0": 1}), 'must hold {"o200k_ids": [int, ...]'),
    (lambda v: v.__setitem__("unknown_id", 512), "unknown_id 512 is not a model id in 0..511"),
    (lambda v: v.__setitem__("unknown_id", True), "unknown_id True is not a model id"),
    (lambda v: v.pop("unknown_id"), "has no unknown_id: a compact vocabulary needs"),
], ids=["too-big", "negative", "duplicate", "float", "string", "bool", "long-string", "length", "not-a-list",
        "unknown-too-big", "unknown-bool", "no-unknown"])
def test_a_bad_vocab_map_is_refused_naming_the_file_and_entry(tmp_path, tiny_checkpoints, no_allocation, edit,
                                                              fragment):
    path, file = _with_vocab_map(tmp_path, tiny_checkpoints, edit)
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    with pytest.raises(CheckpointError, match=re.escape(f"{file}") + ".*" + re.escape(fragment)) as caught:
        ossscope.load(path, device="cpu", progress=False)
    assert len(str(caught.value)) < len(str(file)) + 200  # a hostile entry is quoted short, not whole
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before  # refused, nothing rewritten or removed


def test_the_shipped_nano_vocab_map_passes_the_checks():
    nano = ossscope.load("nano", device="cpu", progress=False)
    assert len(nano.vocab_map) == nano.config.vocab_size and nano.tokenizer.is_compact

# -- steering and ablation on the model: a refusal keeps the old state ----------------------------------------------


@pytest.fixture
def own_model():
    return ossscope.random_model("tiny", seed=3)


@pytest.mark.parametrize("vector_value, scale, fragment", [
    (math.nan, 1.0, "holds NaN or Inf"),
    (math.inf, 1.0, "holds NaN or Inf"),
    (0.5, math.nan, "scale must be a finite number, got nan"),
    (0.5, -math.inf, "scale must be a finite number, got -inf"),
    (3e38, 10.0, "scale \\* vector overflows float32"),
    (0.5, "big", "scale must be a number, got 'big'"),
])
def test_a_nan_or_inf_steering_is_refused_and_the_old_one_kept(own_model, vector_value, scale, fragment):
    model = own_model
    D = model.config.hidden_size
    model.set_steering(2, torch.ones(D), scale=0.5)
    before = model.active_steering[2]
    vector = torch.randn(D)
    vector[3] = vector_value
    with pytest.raises(ValueError, match=fragment):
        model.set_steering(2, vector, scale=scale)
    assert model.active_steering[2] is before and torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_a_failed_ablation_keeps_the_active_one(own_model):
    model = own_model
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    model.set_ablation({1: [0, 3]}, mode="zero")
    expected_logits = model(ids)
    active = {"mode": "zero", "experts": {1: [0, 3]}}
    bad_requests = [
        ({0: [1], 2: list(range(7))}, "reroute", "cannot reroute 7 of 8 experts of layer 2"),  # wiped it before
        ({1: [9]}, "zero", "expert 9"),
        ({7: [1]}, "zero", "layer 7"),
        ({1: [1]}, "cut", "unknown ablation mode"),
    ]
    for request, mode, fragment in bad_requests:
        with pytest.raises(ValueError, match=fragment):
            model.set_ablation(request, mode=mode)
        assert model.active_ablation == active
        with pytest.raises(ValueError, match=fragment), model.ablate(request, mode=mode):
            pass
        assert model.active_ablation == active
    # Not only the record: the masks are still in place, so the model computes what it did before.
    torch.testing.assert_close(model(ids), expected_logits, rtol=0, atol=0)
    model.clear_ablation()
    assert not torch.equal(model(ids), expected_logits)


# -- the Lab: one run at a time, and the end of a run keeps what the user set ---------------------------------------


def _blocking_chat(started: list, release: threading.Event):
    def chat(model, prompt, stream, **options):
        started.append(prompt)
        release.wait(10)
        return ScriptedStream(synthetic_trace(T=4, L=4, E=8, k=2, H=4))

    return chat


def test_two_threads_calling_lab_run_start_one_run(monkeypatch):
    model = _fake_model()
    # Applying interventions takes a while on a real model: widen the window between "is a run going?" and
    # "start one" so that a check without a lock lets both threads through every time.
    clear = model.clear_ablation
    model.clear_ablation = lambda: (time.sleep(0.05), clear())
    started, release = [], threading.Event()
    lab = W.Lab(model, chat_fn=_blocking_chat(started, release), update_interval_s=0.0)
    barrier, threads, refused = threading.Barrier(2), [], []

    def call(prompt):
        barrier.wait()
        try:
            threads.append(lab.run(prompt))
        except RuntimeError as exc:
            refused.append(str(exc))

    callers = [threading.Thread(target=call, args=(f"prompt {i}",)) for i in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)
    deadline = time.time() + 10
    while not started and time.time() < deadline:
        time.sleep(0.01)
    assert lab.running
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(threads) == 1 and len(started) == 1, (started, refused)
    assert refused == ["a run is already in progress: stop it first (lab.stop()) or wait for it to end"]
    assert not lab.running and len(lab.history) == 1
    lab.run("after", wait=True)  # the lock is free again once the run has ended
    assert len(lab.history) == 2


def test_a_refused_lab_run_start_frees_the_lab():
    lab = W.Lab(_fake_model(), chat_fn=_blocking_chat([], threading.Event()))
    with pytest.raises(ValueError, match="the prompt is empty"):
        lab.run("   ")
    assert not lab.running


def test_the_end_of_a_lab_run_keeps_an_ablation_set_during_it():
    model = _fake_model()
    model.set_ablation({0: [1]}, "zero")  # the model's own state before the run
    started, release = [], threading.Event()
    lab = W.Lab(model, chat_fn=_blocking_chat(started, release), update_interval_s=0.0)
    lab.picker.set({2: [3]}, "reroute")
    thread = lab.run("go")
    deadline = time.time() + 10
    while not started and time.time() < deadline:
        time.sleep(0.01)
    assert model.active_ablation == {"mode": "reroute", "experts": {2: [3]}}  # the run's
    model.set_ablation({1: [5, 6]}, "zero")  # the user, in another cell, while the run goes on
    release.set()
    thread.join(10)
    assert model.active_ablation == {"mode": "zero", "experts": {1: [5, 6]}}

    # Left alone, the model's own ablation comes back after a run.
    started.clear()
    lab.run("again", wait=True)
    assert model.active_ablation == {"mode": "zero", "experts": {1: [5, 6]}}


def test_the_end_of_a_lab_run_keeps_steering_set_during_it():
    model = _fake_model()
    started, release = [], threading.Event()
    lab = W.Lab(model, chat_fn=_blocking_chat(started, release), update_interval_s=0.0)
    lab.steering.set_vector(torch.ones(8), layer=1)
    thread = lab.run("go")
    deadline = time.time() + 10
    while not started and time.time() < deadline:
        time.sleep(0.01)
    assert set(model.active_steering) == {1}
    model.set_steering(3, torch.full((8,), 2.0))  # the user's own steering, set during the run
    release.set()
    thread.join(10)
    assert set(model.active_steering) == {1, 3}  # what the model had at the end stays
    lab.steering.enabled.value = False
    lab.run("again", wait=True)
    assert set(model.active_steering) == {1, 3}  # and a later run puts it back too


def test_a_deeply_nested_config_is_refused(tmp_path, tiny_checkpoints, no_allocation):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    (path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        ossscope.load(path, device="cpu", progress=False)


def test_a_config_too_big_for_the_device_is_refused_before_allocating(tmp_path, tiny_checkpoints, no_allocation):
    """Each value in range, together a 16 TiB model: refused from the config alone, naming the sizes."""
    path = _copy(tmp_path, tiny_checkpoints["original"])
    config = json.loads((path / "config.json").read_text())
    config.update(vocab_size=1 << 24, hidden_size=1 << 17)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"describes a model of [\d,.]+ GiB in float32, more than the .* GiB "
                                              r"of memory cpu has .*vocab_size=16777216, hidden_size=131072"):
        ossscope.load(path, device="cpu", progress=False)


def test_model_bytes_matches_the_allocated_model(tiny_model):
    slots = loading.checkpoint_slots(tiny_model.config, "original")
    allocated = sum(t.numel() * t.element_size() for t in tiny_model.state_dict().values())
    assert loading.model_bytes(slots, torch.float32) == allocated
