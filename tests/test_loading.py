"""Loading both layouts, and a clear error for every kind of damaged checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ossscope
from ossscope.loading import CheckpointError

IDS = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_both_layouts_give_identical_logits(tiny_model, tiny_checkpoints, layout):
    loaded = ossscope.load(tiny_checkpoints[layout], device="cpu", progress=False)
    assert torch.equal(loaded(IDS), tiny_model(IDS))
    # experts stay packed in memory
    assert loaded.blocks[0].mlp.mlp1_blocks.dtype == torch.uint8


def test_hf_repo_root_with_original_folder(tmp_path, tiny_model, tiny_checkpoints):
    shutil.copytree(tiny_checkpoints["original"], tmp_path / "repo" / "original")
    (tmp_path / "repo" / "config.json").write_text(json.dumps(tiny_model.config.to_hf_json()))  # no HF weights
    loaded = ossscope.load(tmp_path / "repo", device="cpu", progress=False)
    assert torch.equal(loaded(IDS), tiny_model(IDS))


def test_path_to_the_safetensors_file_and_dtype(tiny_model, tiny_checkpoints):
    loaded = ossscope.load(tiny_checkpoints["original"] / "model.safetensors", device="cpu", dtype="bf16",
                           progress=False)
    assert loaded.dtype == torch.bfloat16
    assert loaded.blocks[1].attn.norm.scale.dtype == torch.float32  # norms stay fp32


def _copy(tmp_path, source, name="ckpt"):
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def _edit_tensors(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def test_missing_tensor_is_named(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    _edit_tensors(path, lambda t: t.pop("block.2.attn.sinks"))
    with pytest.raises(CheckpointError, match=r"missing tensor: block\.2\.attn\.sinks"):
        ossscope.load(path, device="cpu", progress=False)


def test_unexpected_tensor_is_named(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    _edit_tensors(path, lambda t: t.__setitem__("block.0.attn.extra", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor: block\.0\.attn\.extra"):
        ossscope.load(path, device="cpu", progress=False)


def test_wrong_shape_names_tensor_got_and_expected(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    _edit_tensors(path, lambda t: t.__setitem__("block.1.mlp.gate.bias", torch.zeros(9)))
    with pytest.raises(CheckpointError, match=r"block\.1\.mlp\.gate\.bias has shape \(9,\), expected \(8,\)"):
        ossscope.load(path, device="cpu", progress=False)


def test_wrong_dtype_of_packed_weights(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    _edit_tensors(path, lambda t: t.__setitem__("block.0.mlp.mlp1_weight.scales",
                                               t["block.0.mlp.mlp1_weight.scales"].to(torch.int32)))
    with pytest.raises(CheckpointError, match=r"mlp1_weight\.scales has dtype torch\.int32, expected torch\.uint8"):
        ossscope.load(path, device="cpu", progress=False)


def test_truncated_file_is_named(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        ossscope.load(path, device="cpu", progress=False)


def test_not_a_safetensors_file(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    (path / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, maybe a pickle" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        ossscope.load(path, device="cpu", progress=False)


def test_no_config_json(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        ossscope.load(path, device="cpu", progress=False)


def test_config_contradicting_tensors(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_hidden_layers=3 but the checkpoint has tensors for layer 3"):
        ossscope.load(path, device="cpu", progress=False)
    config["num_hidden_layers"], config["hidden_size"] = 4, 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config contradicts the tensors"):
        ossscope.load(path, device="cpu", progress=False)


def test_bad_config_values(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["original"])
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ossscope.load(path, device="cpu", progress=False)
    (path / "config.json").write_text(json.dumps({"num_experts": 8, "hidden_size": 60}))
    with pytest.raises(CheckpointError, match="hidden_size .60. must be a multiple of 32"):
        ossscope.load(path, device="cpu", progress=False)
    (path / "config.json").write_text(json.dumps({"hidden": 1}))
    with pytest.raises(CheckpointError, match="is not a gpt-oss config"):
        ossscope.load(path, device="cpu", progress=False)


def test_missing_shard(tmp_path, tiny_checkpoints):
    path = _copy(tmp_path, tiny_checkpoints["hf"])
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard files that are missing: {shard.name}"):
        ossscope.load(path, device="cpu", progress=False)


def test_missing_path_and_unknown_names():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ossscope.load("/nonexistent/gpt-oss", progress=False)
    with pytest.raises(ValueError, match="unknown preset"):
        ossscope.random_model("gpt-oss-7b")
    with pytest.raises(ValueError, match="unknown dtype"):
        ossscope.random_model("tiny", dtype="float8")


def test_presets_have_the_published_shapes():
    c20, c120 = ossscope.PRESETS["gpt-oss-20b"], ossscope.PRESETS["gpt-oss-120b"]
    assert (c20.num_hidden_layers, c20.num_experts, c120.num_hidden_layers, c120.num_experts) == (24, 32, 36, 128)
    model = ossscope.Model(c20.replace(num_hidden_layers=1, vocab_size=64), device="meta")
    active = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    assert active > 0 and model.blocks[0].mlp.mlp1_blocks.shape == (32, 5760, 90, 16)
