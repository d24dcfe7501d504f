"""The quantize stage end to end on a tiny model: artifact layout, manifest, interop."""

import json

import pytest
import torch
from safetensors.torch import load_file

from inferkit.artifacts import sha256_file
from inferkit.config import QuantizeConfig, Recipe
from inferkit.data.calibration import CalibrationConfig
from inferkit.errors import InferkitError
from inferkit.models import load_model
from inferkit.quant.scheme import QuantFormat
from inferkit.stages.calibrate import run_calibrate
from inferkit.stages.quantize import run_quantize

CALIB = CalibrationConfig(source="seed", num_samples=8, seq_len=64)
IDS = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))


def recipe(**q) -> Recipe:
    base = dict(method="gptq", bits=4, group_size=32, symmetric=True, batch_size=4)
    return Recipe(quantize=QuantizeConfig(**{**base, **q}), calibration=CALIB)


@pytest.fixture(scope="module")
def gptq_artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "art"
    result = run_quantize(str(tiny_llama), recipe(symmetric=False, actorder=True, scale_search=True), out)
    return out, result


def test_artifact_layout(gptq_artifact):
    out, result = gptq_artifact
    tensors = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{name}.weight_packed"].dtype == torch.int32
    assert tensors[f"{name}.weight_packed"].shape == (64, 8)  # 64 inputs / 8 per word
    assert tensors[f"{name}.weight_scale"].shape == (64, 2)
    assert tensors[f"{name}.weight_zero_point"].shape == (8, 2)  # 64 outputs packed / 8
    assert tensors[f"{name}.weight_shape"].tolist() == [64, 64]
    assert f"{name}.weight" not in tensors
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["ignore"] == ["lm_head"]
    w = qc["config_groups"]["group_0"]["weights"]
    assert (w["num_bits"], w["group_size"], w["strategy"], w["symmetric"], w["actorder"]) == (4, 32, "group", False, "static")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "inferkit.json"):
        assert (out / f).is_file()


def test_manifest_hashes_every_file(gptq_artifact):
    out, result = gptq_artifact
    manifest = json.loads((out / "inferkit.json").read_text())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"inferkit.json"}
    assert set(manifest["files"]) == files
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / rel)
    assert manifest["recipe"]["quantize"]["bits"] == 4
    assert manifest["layers"]["model.layers.1.mlp.down_proj"] == "int4-g32-asym"
    assert manifest["layers"]["lm_head"] == "full-precision"
    assert set(manifest["source"]["inputs_sha256"]) >= {"model.safetensors", "config.json"}
    # 14 linears of 64x64, 64x32 (k, v), 96x64, 64x96: int4 + fp32 scale + int4 zero per 32.
    assert manifest["bits_per_weight"] == pytest.approx(4 + (32 + 4) / 32)
    assert result.bits_per_weight == pytest.approx(5.125)


@pytest.mark.parametrize("q", [
    dict(symmetric=False, actorder=True, scale_search=True),
    dict(symmetric=True),
    dict(bits=8, group_size=None),
    dict(method="rtn", group_size=32, symmetric=False),
    dict(overrides={"mlp.down_proj": "int8-ch-sym", "k_proj": "skip"}),
], ids=["w4-asym-act", "w4-sym", "w8-ch", "rtn-asym", "mixed"])
def test_transformers_loads_artifact_with_same_logits(tiny_llama, tmp_path, q):
    """compressed-tensors' own loader and inferkit's dequantization agree to 1e-4."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "art"
    run_quantize(str(tiny_llama), recipe(**q), out)
    ours = load_model(out, tokenizer=False).model(IDS).logits
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(IDS).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    fp = load_model(tiny_llama, tokenizer=False).model(IDS).logits
    assert (ours - fp).abs().max().item() > 1e-3  # the weights really were quantized


def test_mixed_plan_writes_one_group_per_format(tiny_llama, tmp_path):
    out = tmp_path / "mixed"
    run_quantize(str(tiny_llama), recipe(overrides={"mlp.down_proj": "int8-ch-sym", "k_proj": "skip"}), out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["num_bits"]: g["targets"] for g in qc["config_groups"].values()}
    assert groups[8] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert "model.layers.0.self_attn.q_proj" in groups[4] and len(groups[4]) == 10
    assert qc["ignore"] == ["lm_head", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]


def test_gptq_beats_rtn_on_the_tiny_model(tiny_llama, tmp_path):
    from inferkit.data.calibration import build_samples
    from inferkit.eval import evaluate

    fp = load_model(tiny_llama)
    windows = build_samples(CalibrationConfig(source="seed", split="heldout", num_samples=8, seq_len=64, seed=5), fp.tokenizer)
    calib = CalibrationConfig(source="seed", num_samples=32, seq_len=64)
    kl = {}
    for method in ("rtn", "gptq"):
        r = Recipe(quantize=recipe(method=method).quantize, calibration=calib)
        run_quantize(str(tiny_llama), r, tmp_path / method)
        kl[method] = evaluate(load_model(tmp_path / method, tokenizer=False).model, windows, fp.model)["kl_divergence"]
    assert kl["gptq"] < 0.8 * kl["rtn"]  # held-out text, not the calibration windows


def test_saved_stats_reproduce_first_layer(tiny_llama, tmp_path):
    """Layer 0 sees the same inputs either way, so GPTQ from saved stats matches it exactly."""
    summary = run_calibrate(str(tiny_llama), CALIB, tmp_path / "stats", batch_size=4)
    assert summary["num_tokens"] == 8 * 64
    assert summary["shared"]["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    assert summary["shared"]["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
    assert "model.layers.0.self_attn.o_proj" not in summary["shared"]
    run_quantize(str(tiny_llama), recipe(), tmp_path / "a", stats_dir=tmp_path / "stats")
    run_quantize(str(tiny_llama), recipe(), tmp_path / "b")
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        key = f"model.layers.0.self_attn.{name}.weight_packed"
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["model.layers.1.mlp.down_proj.weight_packed"], b["model.layers.1.mlp.down_proj.weight_packed"])


def test_stats_hessian_matches_direct_computation(tiny_llama, tmp_path):
    """The saved XᵀX for q_proj equals the one computed from the normed layer-0 inputs."""
    from inferkit.data.calibration import build_samples

    run_calibrate(str(tiny_llama), CALIB, tmp_path / "stats", batch_size=4)
    saved = load_file(str(tmp_path / "stats" / "layer_000.safetensors"))["model.layers.0.self_attn.q_proj.xtx"]
    loaded = load_model(tiny_llama)
    ids = build_samples(CALIB, loaded.tokenizer)
    captured = []
    layer = loaded.model.model.layers[0]
    handle = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        loaded.model(ids)
    handle.remove()
    x = torch.cat(captured)
    assert torch.allclose(saved, x.t() @ x, rtol=1e-4, atol=1e-3)


def test_group_size_that_does_not_divide(tiny_llama, tmp_path):
    with pytest.raises(InferkitError, match=r"group size 64 does not divide model.layers.0.mlp.down_proj's input dimension 96; group sizes that divide it: \[32\]"):
        run_quantize(str(tiny_llama), recipe(group_size=64), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_existing_output_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InferkitError, match="already exists; pass --overwrite"):
        run_quantize(str(tiny_llama), recipe(method="rtn"), out)
    assert (out / "keep.txt").read_text() == "mine"
    run_quantize(str(tiny_llama), recipe(method="rtn"), out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_interrupted_run_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    import inferkit.stages.artifact as artifact

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        run_quantize(str(tiny_llama), recipe(method="rtn"), tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_nothing_left_to_quantize(tiny_llama, tmp_path):
    with pytest.raises(InferkitError, match="no linear layer is left"):
        run_quantize(str(tiny_llama), recipe(method="rtn", ignore=("re:.*",)), tmp_path / "x")


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures(tiny_models, tmp_path, arch):
    out = tmp_path / arch
    result = run_quantize(str(tiny_models[arch]), recipe(), out)
    assert sum(f is not None for f in result.layer_formats.values()) == 14
    logits = load_model(out, tokenizer=False).model(IDS).logits
    assert torch.isfinite(logits).all()


def test_bits_per_weight_counts_scales_for_int8_channel(tiny_llama, tmp_path):
    result = run_quantize(str(tiny_llama), recipe(method="rtn", bits=8, group_size=None), tmp_path / "w8")
    rows = 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64)  # output channels of all quantized linears
    numel = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 96 * 64 * 2 + 64 * 96)
    assert result.bits_per_weight == pytest.approx((numel * 8 + rows * 32) / numel)
    assert result.layer_formats["model.layers.0.mlp.up_proj"] == QuantFormat(8, None, True)


@pytest.mark.parametrize("arch,method", [("llama", "gptq"), ("mistral", "gptq"), ("llama", "rtn")])
def test_quantized_head(tiny_models, tmp_path, arch, method):
    """lm_head quantized too (tied to the embeddings in llama, separate in mistral): GPTQ solves
    it on the final norm's outputs; the embeddings stay full precision and are stored apart."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "art"
    result = run_quantize(str(tiny_models[arch]), recipe(method=method, ignore=[]), out)
    assert result.layer_formats["lm_head"] == QuantFormat(4, 32, True)
    assert ("lm_head" in result.gptq_loss) == (method == "gptq")
    state = load_file(out / "model.safetensors")
    assert "lm_head.weight_packed" in state and "lm_head.weight" not in state
    fp = load_model(tiny_models[arch], tokenizer=False).model
    assert torch.equal(state["model.embed_tokens.weight"], fp.model.embed_tokens.weight)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and "lm_head" not in config["quantization_config"]["ignore"]
    ours = load_model(out, tokenizer=False).model
    assert not torch.equal(ours.lm_head.weight, fp.lm_head.weight)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (ours(IDS).logits - theirs(IDS).logits).abs().max().item() < 1e-4


def test_head_needs_sequential_gptq_with_saved_stats(tiny_llama, tmp_path):
    run_calibrate(str(tiny_llama), CALIB, tmp_path / "stats", batch_size=4)
    with pytest.raises(InferkitError, match="saved calibration stats cover the decoder layers only"):
        run_quantize(str(tiny_llama), recipe(ignore=[]), tmp_path / "out", stats_dir=tmp_path / "stats")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
def test_16_bit_scales(tiny_llama, tmp_path, scale_dtype):
    """Scales stored in 16 bits: half the scale bits, and the stored grid is the one GPTQ used."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    out = tmp_path / scale_dtype
    result = run_quantize(str(tiny_llama), recipe(scale_dtype=scale_dtype), out)
    assert result.bits_per_weight == pytest.approx(4 + 16 / 32)
    state = load_file(out / "model.safetensors")
    assert state["model.layers.0.mlp.up_proj.weight_scale"].dtype == getattr(torch, scale_dtype)
    ours = load_model(out, tokenizer=False).model
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (ours(IDS).logits - theirs(IDS).logits).abs().max().item() < 1e-4
    # GPTQ's own output error is what the stored weights give: nothing lost in storing
    manifest = json.loads((out / "inferkit.json").read_text())
    assert manifest["recipe"]["quantize"]["scale_dtype"] == scale_dtype
