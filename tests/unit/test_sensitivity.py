"""sensitivity-scan measures what it says, resumes, and its plans drive quantize."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from inferkit.config import QuantizeConfig, Recipe, ScanConfig
from inferkit.data.calibration import CalibrationConfig, build_samples
from inferkit.errors import InferkitError
from inferkit.models import load_model
from inferkit.quant.rtn import quantize_weight_rtn
from inferkit.quant.scheme import QuantFormat
from inferkit.stages import sensitivity as sens
from inferkit.stages.calibrate import run_calibrate
from inferkit.stages.plan import load_scan, make_plan
from inferkit.stages.quantize import run_quantize

CALIB = CalibrationConfig(source="seed", num_samples=8, seq_len=64)
FORMATS = ("int8-ch", "int4-g32", "int4-g64")


def recipe(method="gptq", **scan) -> Recipe:
    return Recipe(quantize=QuantizeConfig(method=method, bits=4, group_size=32, batch_size=4), calibration=CALIB,
                  sensitivity=ScanConfig(**{"formats": FORMATS, "eval_samples": 4, "eval_seq_len": 64, **scan}))


@pytest.fixture(scope="module")
def block_scan(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "block"
    r = recipe()
    return sens.run_scan(str(tiny_llama), r, r.sensitivity, out), out


def test_scan_layout(block_scan):
    result, out = block_scan
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.png", "scan.json", "timings.json"]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [u["name"] for u in result["units"][:4]] == ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                                                      "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"]
    assert len(result["units"]) == 8
    for unit in result["units"]:
        row = result["costs"][unit["name"]]
        fits = ["int8-ch-sym", "int4-g32-sym"] + (["int4-g64-sym"] if unit["name"].endswith("down_proj") is False else [])
        assert sorted(row) == sorted(fits)
        assert row["int8-ch-sym"] < row["int4-g32-sym"] / 20  # 8 bits hurt far less than 4
    assert not (out.parent / ".block.partial").exists()


def _rtn(w, name):
    return quantize_weight_rtn(w, QuantFormat(4, 32)).dequantize()


def test_block_cost_is_the_block_output_error(tiny_llama, tmp_path):
    r = recipe(method="rtn")
    result = sens.run_scan(str(tiny_llama), r, r.sensitivity, tmp_path / "s")
    loaded = load_model(tiny_llama)
    samples = build_samples(replace(CALIB, split="heldout", num_samples=4, seq_len=64, seed=CALIB.seed + 1), loaded.tokenizer)
    model = loaded.model
    captured = {}
    layer = model.model.layers[1]
    hook = layer.register_forward_pre_hook(lambda m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(samples, use_cache=False)
        hook.remove()
        hidden = captured["args"][0] if captured["args"] else captured["kwargs"].pop("hidden_states")
        kwargs = {k: v for k, v in captured["kwargs"].items() if k not in ("hidden_states", "past_key_values", "use_cache")}
        ref = layer(hidden, **kwargs)
        ref = ref[0] if isinstance(ref, tuple) else ref
        mlp = layer.mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight.data = _rtn(proj.weight.data, "")
        out = layer(hidden, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
    expected = float((out - ref).double().pow(2).mean())
    calibration = result["layer_calibration"]["1"]
    assert calibration["scale"] == pytest.approx(calibration["kl"] / calibration["block_sum"], rel=1e-12)
    assert calibration["kl"] > 0 and calibration["formats"]["model.layers.1.mlp.down_proj"] == "int4-g32-sym"
    assert result["costs"]["model.layers.1.mlp.gate_up_proj"]["int4-g32-sym"] == pytest.approx(expected * calibration["scale"], rel=1e-4)


def test_kl_cost_is_the_next_token_kl(tiny_llama, tmp_path):
    r = recipe(method="rtn", mode="kl")
    result = sens.run_scan(str(tiny_llama), r, r.sensitivity, tmp_path / "s")
    loaded = load_model(tiny_llama)
    samples = build_samples(replace(CALIB, split="heldout", num_samples=4, seq_len=64, seed=CALIB.seed + 1), loaded.tokenizer)
    model = loaded.model
    with torch.no_grad():
        logp = torch.log_softmax(model(samples).logits, -1)
        o = model.model.layers[0].self_attn.o_proj
        o.weight.data = _rtn(o.weight.data, "")
        logq = torch.log_softmax(model(samples).logits, -1)
    expected = float((logp.exp() * (logp - logq)).sum(-1).mean())
    assert result["costs"]["model.layers.0.self_attn.o_proj"]["int4-g32-sym"] == pytest.approx(expected, rel=1e-3)


def test_proxy_from_saved_stats(tiny_llama, tmp_path):
    run_calibrate(str(tiny_llama), CALIB, tmp_path / "stats", batch_size=4)
    r = recipe(method="rtn", mode="proxy")
    result = sens.run_scan(str(tiny_llama), r, r.sensitivity, tmp_path / "s", stats_dir=tmp_path / "stats")
    summary = json.loads((tmp_path / "stats" / "stats.json").read_text())
    h = load_file(tmp_path / "stats" / "layer_001.safetensors")["model.layers.1.mlp.gate_proj.xtx"].double() / summary["num_tokens"]
    w = load_model(tiny_llama, tokenizer=False).model.model.layers[1].mlp.down_proj.weight.data
    h_down = load_file(tmp_path / "stats" / "layer_001.safetensors")["model.layers.1.mlp.down_proj.xtx"].double() / summary["num_tokens"]
    d = (_rtn(w, "") - w).double()
    expected = float(torch.einsum("oi,ij,oj->", d, h_down, d))
    assert result["costs"]["model.layers.1.mlp.down_proj"]["int4-g32-sym"] == pytest.approx(expected, rel=1e-4)
    assert h.shape == (64, 64)


def test_interrupted_scan_resumes(tiny_llama, tmp_path, monkeypatch):
    r = recipe()
    out = tmp_path / "scan"

    def stop_after_first(done, total, _label):
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sens.run_scan(str(tiny_llama), r, r.sensitivity, out, progress=stop_after_first)
    partial = tmp_path / ".scan.partial"
    assert sorted(p.name for p in partial.iterdir()) == ["layer_000.json", "settings.json"]
    assert not out.exists()
    scanned = []
    original = sens._scan_layer
    monkeypatch.setattr(sens, "_scan_layer", lambda model, idx, *a: scanned.append(idx) or original(model, idx, *a))
    resumed = sens.run_scan(str(tiny_llama), r, r.sensitivity, out)
    assert scanned == [1]
    fresh = sens.run_scan(str(tiny_llama), r, r.sensitivity, tmp_path / "fresh")
    assert resumed["costs"] == fresh["costs"]


def test_partial_scan_with_other_settings(tiny_llama, tmp_path):
    r = recipe()
    with pytest.raises(KeyboardInterrupt):
        sens.run_scan(str(tiny_llama), r, r.sensitivity, tmp_path / "scan", progress=lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    other = recipe(mode="proxy")
    with pytest.raises(InferkitError, match="interrupted scan with other settings"):
        sens.run_scan(str(tiny_llama), other, other.sensitivity, tmp_path / "scan")
    result = sens.run_scan(str(tiny_llama), other, other.sensitivity, tmp_path / "scan", overwrite=True)
    assert result["mode"] == "proxy"


def test_plan_drives_quantize_and_is_reproducible(tiny_llama, block_scan, tmp_path):
    scan, out = block_scan
    data, file = load_scan(out)
    plan = make_plan(data, file, target_bpw=5.5)
    assert plan == make_plan(*load_scan(out), target_bpw=5.5)
    assert 5.0 < plan["bits_per_weight"] <= 5.5
    assert set(plan["format_counts"]) == {"int8-ch-sym", "int4-g32-sym"} or len(plan["format_counts"]) > 1
    a = run_quantize(str(tiny_llama), recipe(), tmp_path / "a", plan=plan)
    run_quantize(str(tiny_llama), recipe(), tmp_path / "b", plan=plan)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a.bits_per_weight == pytest.approx(plan["bits_per_weight"], abs=1e-9)
    for name, fmt in plan["layers"].items():
        assert a.layer_formats[name].name == fmt
    manifest = json.loads((tmp_path / "a" / "inferkit.json").read_text())
    assert manifest["plan"]["predicted_cost"] == plan["predicted_cost"]
    qc = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    targets = {g["weights"]["num_bits"]: set(g["targets"]) for g in qc["config_groups"].values()}
    assert targets[8] == {n for n, f in plan["layers"].items() if f == "int8-ch-sym"}
    assert json.loads((tmp_path / "a" / "plan.json").read_text()) == plan


def test_same_inputs_give_byte_identical_scan_and_artifact(tiny_llama, tmp_path):
    r = replace(recipe(), quantize=replace(recipe().quantize, target_bpw=5.5))
    run_quantize(str(tiny_llama), r, tmp_path / "a")
    run_quantize(str(tiny_llama), r, tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert {"plan.json", "reports/sensitivity.json", "reports/sensitivity.png", "model.safetensors"} <= {str(f) for f in files}
    for name in files:
        if name.suffix != ".png":  # matplotlib may stamp its own metadata
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_plan_errors(tiny_llama, tiny_llama_other, block_scan, tmp_path):
    data, file = load_scan(block_scan[1])
    plan = make_plan(data, file, target_bpw=6)
    with pytest.raises(InferkitError, match="made for another model"):
        run_quantize(str(tiny_llama_other), recipe(), tmp_path / "x", plan=plan)
    bad = json.loads(json.dumps(plan))
    bad["layers"]["model.layers.7.mlp.down_proj"] = "int8-ch-sym"
    with pytest.raises(InferkitError, match="names model.layers.7.mlp.down_proj, which is not a linear layer"):
        run_quantize(str(tiny_llama), recipe(), tmp_path / "x", plan=bad)
    with pytest.raises(InferkitError, match="below the smallest plan"):
        make_plan(data, file, target_bpw=3.0)
    with pytest.raises(InferkitError, match="above the largest plan"):
        make_plan(data, file, target_bpw=9.0)
    assert not (tmp_path / "x").exists()


def test_plan_and_scan_files_are_checked(tmp_path):
    from inferkit.stages.plan import load_plan

    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "other.json").write_text('{"kind": "something"}')
    with pytest.raises(InferkitError, match="bad.json is not valid JSON"):
        load_plan(tmp_path / "bad.json")
    with pytest.raises(InferkitError, match="other.json is not an inferkit plan"):
        load_plan(tmp_path / "other.json")
    with pytest.raises(InferkitError, match="other.json is not an inferkit sensitivity scan"):
        load_scan(tmp_path / "other.json")
    with pytest.raises(InferkitError, match="plan .*missing.json does not exist"):
        load_plan(tmp_path / "missing.json")
