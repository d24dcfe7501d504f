from pathlib import Path

import pytest

from inferkit.config import Recipe, load_recipe, matches, recipe_from_dict, with_overrides
from inferkit.errors import InferkitError
from inferkit.quant.scheme import QuantFormat
from inferkit.stages.demo import W4A16_G64

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_unknown_keys_are_errors_naming_the_key():
    with pytest.raises(InferkitError, match=r"unknown key recipe.quantize.bitz; allowed keys: .*bits"):
        recipe_from_dict({"quantize": {"bitz": 4}})
    with pytest.raises(InferkitError, match=r"unknown key recipe.calibrate"):
        recipe_from_dict({"calibrate": {}})


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_recipe_files():
    w8 = load_recipe(RECIPES / "w8a16.yaml").quantize
    assert (w8.method, w8.format) == ("gptq", QuantFormat(8, None, True))
    rtn = load_recipe(RECIPES / "w4a16-g64-rtn.yaml").quantize
    assert (rtn.method, rtn.format) == ("rtn", QuantFormat(4, 64, True))
    for bpw in (4.5, 5):
        mixed = load_recipe(RECIPES / f"mixed-{bpw}bpw.yaml")
        assert (mixed.quantize.target_bpw, mixed.quantize.scale_dtype) == (bpw, "float16")
        assert mixed.sensitivity.mode == "block" and "int3-g64" in mixed.sensitivity.formats
    serve = load_recipe(RECIPES / "mixed-4.5bpw.yaml").serve_test
    assert (serve.min_agreement, serve.min_kv_utilisation, serve.prompt_len) == (0.98, 0.85, (32, 256))


def test_serve_test_section_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("serve_test:\n  min_agreemnt: 0.9\n")
    with pytest.raises(InferkitError, match="unknown key r.yaml.serve_test.min_agreemnt"):
        load_recipe(bad)
    bad.write_text("serve_test:\n  output_len: [9, 3]\n")
    with pytest.raises(InferkitError, match="output_len"):
        load_recipe(bad)


def test_demo_uses_the_w4a16_g64_recipe():
    assert load_recipe(RECIPES / "w4a16-g64.yaml") == W4A16_G64


def test_flags_override_recipe():
    base = load_recipe(RECIPES / "w4a16-g64.yaml")
    r = with_overrides(base, {"method": "rtn", "group_size": None, "symmetric": True}, {"num_samples": 4})
    assert r.quantize.method == "rtn" and r.quantize.group_size == 64 and r.quantize.symmetric
    assert r.calibration.num_samples == 4
    assert with_overrides(base, {"group_size": 0}).quantize.group_size is None
    assert with_overrides(Recipe(), {"bits": 8}).quantize.format == QuantFormat(8, None, True)


def test_layer_patterns_ignore_and_overrides():
    r = recipe_from_dict({"quantize": {"ignore": ["lm_head", "re:.*layers\\.0\\..*"],
                                       "overrides": {"mlp.down_proj": "int8-ch-sym", "k_proj": "skip"}}})
    q = r.quantize
    assert q.format_for("lm_head") is None
    assert q.format_for("model.layers.0.self_attn.q_proj") is None
    assert q.format_for("model.layers.1.mlp.down_proj") == QuantFormat(8, None, True)
    assert q.format_for("model.layers.1.self_attn.k_proj") is None
    assert q.format_for("model.layers.1.self_attn.q_proj") == QuantFormat(4, 64, True)
    assert matches("re:.*proj", "a.q_proj") and not matches("proj", "a.q_proj")


@pytest.mark.parametrize("data,message", [
    ({"quantize": {"method": "awq"}}, "unknown method 'awq'"),
    ({"quantize": {"bits": 5}}, "unsupported bit width 5"),
    ({"quantize": {"group_size": 48}}, "unsupported group size 48"),
    ({"quantize": {"overrides": {"x": "int9"}}}, "unsupported bit width 9"),
    ({"calibration": {"num_samples": 0}}, "at least 1"),
    ({"quantize": []}, "must be a mapping"),
    ({"quantize": {"scale_dtype": "int8"}}, "unknown scale_dtype 'int8'"),
    ({"quantize": {"target_bpw": 4.5, "max_cost": 1.0}}, "give target_bpw or max_cost, not both"),
    ({"sensitivity": {"mode": "hessian"}}, "unknown scan mode 'hessian'"),
    ({"sensitivity": {"formats": ["int4-g48"]}}, "unsupported group size 48"),
    ({"sensitivity": {"mode": "kl", "speed": 2}}, "unknown key recipe.sensitivity.speed"),
])
def test_bad_values(data, message):
    with pytest.raises(InferkitError, match=message):
        recipe_from_dict(data)


def test_bad_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("quantize: [unclosed")
    with pytest.raises(InferkitError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(InferkitError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
