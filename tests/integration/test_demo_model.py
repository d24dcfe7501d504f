"""The real demo model (SmolLM2-135M-Instruct): GGUF import, artifact interop, GPTQ vs RTN."""

import json
from pathlib import Path

import pytest
import torch

from inferkit.config import QuantizeConfig, Recipe
from inferkit.data.calibration import CalibrationConfig
from inferkit.eval import EvalWindows, evaluate, text_windows
from inferkit.models import load_model
from inferkit.stages.quantize import run_quantize

WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2"
IDS = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))


def test_demo_model_shape(demo_model):
    config = json.loads((demo_model / "config.json").read_text())
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("llama", 576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert "quantization_config" not in config


def test_gguf_import_matches_converted_folder(demo_model, demo_gguf):
    a = load_model(demo_gguf, tokenizer=False).model(IDS).logits
    b = load_model(demo_model, tokenizer=False).model(IDS).logits
    assert torch.equal(a, b)


def test_artifact_loads_in_transformers_with_same_logits(demo_model, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    recipe = Recipe(quantize=QuantizeConfig(method="rtn", bits=4, group_size=64, symmetric=False))
    run_quantize(str(demo_model), recipe, tmp_path / "art")
    ours = load_model(tmp_path / "art", tokenizer=False).model(IDS).logits
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "art", dtype=torch.float32).eval()(IDS).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    size = (tmp_path / "art" / "model.safetensors").stat().st_size
    assert size < 0.45 * (demo_model / "model.safetensors").stat().st_size


def test_gptq_beats_rtn_on_wikitext(demo_model, tmp_path):
    if not WIKITEXT.is_dir():
        pytest.skip("needs ../shared/data/wikitext-2")
    calib = CalibrationConfig(source=str(WIKITEXT / "valid.txt"), num_samples=16, seq_len=256)
    fp = load_model(demo_model)
    windows = text_windows(fp.tokenizer, (WIKITEXT / "test.txt").read_text(), EvalWindows(256, 4))
    ppl = {}
    for method in ("rtn", "gptq"):
        recipe = Recipe(quantize=QuantizeConfig(method=method, bits=4, group_size=64, actorder=True), calibration=calib)
        run_quantize(str(demo_model), recipe, tmp_path / method)
        ppl[method] = evaluate(load_model(tmp_path / method, tokenizer=False).model, windows)["perplexity"]
    fp_ppl = evaluate(fp.model, windows)["perplexity"]
    assert fp_ppl < ppl["gptq"] < ppl["rtn"]


def test_demo_command(demo_model, tmp_path):
    from typer.testing import CliRunner

    from inferkit.cli.main import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--num-samples", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    fp, q = report["rows"]
    assert q["bits_per_weight"] == pytest.approx(4.5625)  # int4 + fp32 scale + int4 zero per 64
    assert q["weights_mb"] < 0.45 * fp["weights_mb"]
    assert fp["perplexity"] < q["perplexity"] < 1.5 * fp["perplexity"]
    assert 0 < q["kl_divergence"] < 0.5
    assert "perplexity" in result.output
