"""Lazy loading: decoder linears read one layer at a time give the same model and artifacts."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from inferkit.config import QuantizeConfig, Recipe
from inferkit.data.calibration import CalibrationConfig
from inferkit.errors import InferkitError
from inferkit.models import load_model
from inferkit.models import lazy as lazy_mod
from inferkit.stages import layerwise
from inferkit.stages.calibrate import run_calibrate
from inferkit.stages.quantize import run_quantize

IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
CALIB = CalibrationConfig(source="seed", num_samples=8, seq_len=64)


def _all_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_lazy_model_equals_whole_model(tiny_models, arch):
    whole = load_model(tiny_models[arch], tokenizer=False).model
    loaded = load_model(tiny_models[arch], tokenizer=False, lazy=True)
    assert loaded.weights is not None
    decoder = layerwise.linear_modules(loaded.model.model.layers[0], "model.layers.0")
    assert all(m.weight.is_meta for m in decoder.values())
    assert not loaded.model.model.embed_tokens.weight.is_meta
    loaded.load_weights(_all_linears(loaded.model))
    got = loaded.model.state_dict()
    for key, tensor in whole.state_dict().items():
        assert torch.equal(got[key], tensor), key
    assert torch.equal(loaded.model(IDS).logits, whole(IDS).logits)
    assert loaded.model.generation_config.eos_token_id == whole.generation_config.eos_token_id


def test_release_frees_and_reload_restores(tiny_llama):
    loaded = load_model(tiny_llama, tokenizer=False, lazy=True)
    linears = layerwise.linear_modules(loaded.model.model.layers[1], "model.layers.1")
    loaded.load_weights(linears)
    before = {n: m.weight.clone() for n, m in linears.items()}
    lazy_mod.LazyWeights.release(linears)
    assert all(m.weight.is_meta for m in linears.values())
    loaded.load_weights(linears)
    assert all(torch.equal(linears[n].weight, w) for n, w in before.items())


def test_sharded_checkpoint(tiny_llama, tmp_path):
    whole = load_model(tiny_llama, tokenizer=False).model
    folder = tmp_path / "sharded"
    whole.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / lazy_mod.INDEX).is_file() and len(list(folder.glob("*.safetensors"))) > 2
    loaded = load_model(folder, tokenizer=False, lazy=True)
    assert loaded.weights is not None
    loaded.load_weights(_all_linears(loaded.model))
    assert torch.equal(loaded.model(IDS).logits, whole(IDS).logits)


def test_unknown_tensor_names_fall_back_to_whole_load(tiny_llama, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        (folder / name).write_text((tiny_llama / name).read_text())
    state = load_file(tiny_llama / "model.safetensors")
    state["extra.unused"] = torch.zeros(2)
    del state["model.norm.weight"]  # transformers initialises what is missing; lazy cannot
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(folder, tokenizer=False, lazy=True)
    assert loaded.weights is None
    assert not any(p.is_meta for p in loaded.model.parameters())


def test_shape_mismatch_is_a_clear_error(tiny_llama, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("config.json", "generation_config.json"):
        (folder / name).write_text((tiny_llama / name).read_text())
    state = load_file(tiny_llama / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:, :32].contiguous()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(folder, tokenizer=False, lazy=True)
    with pytest.raises(InferkitError, match=r"up_proj.weight has shape \(96, 32\), the model expects \(96, 64\)"):
        loaded.load_weights(layerwise.linear_modules(loaded.model.model.layers[0], "model.layers.0"))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_lazy_quantize_writes_the_same_artifact(tiny_llama, tmp_path, monkeypatch, method):
    recipe = Recipe(quantize=QuantizeConfig(method=method, bits=4, group_size=32, batch_size=4,
                                            ignore=["lm_head", "model.layers.1.mlp.down_proj"]),
                    calibration=CALIB)
    run_quantize(str(tiny_llama), recipe, tmp_path / "lazy")
    monkeypatch.setattr("inferkit.models.loading.build_lazy_model", lambda *a: None)
    run_quantize(str(tiny_llama), recipe, tmp_path / "whole")
    lazy_state, whole_state = load_file(tmp_path / "lazy" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert lazy_state.keys() == whole_state.keys()
    assert "model.layers.1.mlp.down_proj.weight" in lazy_state  # kept in full precision
    for key in whole_state:
        assert torch.equal(lazy_state[key], whole_state[key]), key


def test_lazy_calibrate_writes_the_same_stats(tiny_llama, tmp_path, monkeypatch):
    run_calibrate(str(tiny_llama), CALIB, tmp_path / "lazy", batch_size=4)
    monkeypatch.setattr("inferkit.models.loading.build_lazy_model", lambda *a: None)
    run_calibrate(str(tiny_llama), CALIB, tmp_path / "whole", batch_size=4)
    for idx in range(2):
        a = load_file(tmp_path / "lazy" / f"layer_{idx:03d}.safetensors")
        b = load_file(tmp_path / "whole" / f"layer_{idx:03d}.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    lazy_layers = json.loads((tmp_path / "lazy" / "stats.json").read_text())["layers"]
    assert lazy_layers == json.loads((tmp_path / "whole" / "stats.json").read_text())["layers"]
