"""inferkit serve-test on a tiny artifact: report, JUnit XML, thresholds and exit codes."""

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from inferkit.cli.main import app
from inferkit.config import QuantizeConfig, Recipe, ServeTestConfig, load_recipe
from inferkit.data.calibration import CalibrationConfig
from inferkit.errors import InferkitError
from inferkit.stages.quantize import run_quantize
from inferkit.stages.serve_test import make_workload, percentile

runner = CliRunner()
SMALL = ["--num-requests", 6, "--prompt-len", "8:32", "--output-len", "4:12", "--windows", 2, "--window-size", 64,
         "--max-model-len", 128, "--num-kv-blocks", 40]


def invoke(*args):
    result = runner.invoke(app, ["serve-test", *[str(a) for a in args]])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "w4"
    recipe = Recipe(quantize=QuantizeConfig(method="rtn", bits=4, group_size=32, symmetric=False),
                    calibration=CalibrationConfig(source="seed", num_samples=4, seq_len=32))
    run_quantize(str(tiny_llama), recipe, out)
    return out


def test_passing_run_writes_report_and_junit(artifact, tmp_path):
    out = tmp_path / "st"
    code, output = invoke(artifact, "-o", out, "--linear-backend", "torch", *SMALL)
    assert code == 0, output
    assert "serve-test passed" in output
    report = json.loads((out / "report.json").read_text())
    q, load, mem = report["quality"], report["load"], report["memory"]
    # The default reference is the artifact's own weights: the exact backend must reproduce them.
    assert report["backends"] == {"linear": "torch", "attention": "torch"}
    assert report["pdl_launches"] is False and report["config"]["pdl"] is False
    assert "matmul launches" not in output  # the summary's PDL row only when PDL was asked for
    assert q["agreement"] == 1.0 and abs(q["ppl_increase_pct"]) < 0.01
    assert load["requests"] == 6 and load["failed_requests"] == 0
    assert 4 * 6 <= load["generated_tokens"] <= 12 * 6
    assert load["ttft_ms_p50"] <= load["ttft_ms_p99"] and load["itl_ms_p50"] > 0
    assert 0 < load["kv_utilisation"] <= 1 and load["contiguous_utilisation"] < load["kv_utilisation"]
    assert load["peak_kv_blocks_used"] <= 40 and mem["peak_rss_mb"] > 0
    suite = ET.parse(out / "junit.xml").getroot()
    names = [c.get("name") for c in suite.iter("testcase")]
    assert names == ["failed_requests", "agreement", "ppl_increase_pct"]
    assert suite.get("failures") == "0" and not list(suite.iter("failure"))


def test_failed_threshold_exits_1_and_is_in_junit(artifact, tmp_path):
    out = tmp_path / "st"
    code, output = invoke(artifact, "-o", out, *SMALL, "--no-quality", "--min-throughput", 1e9, "--max-itl-p99-ms", 1e9)
    assert code == 1
    assert "serve-test failed: throughput_tok_s" in output
    suite = ET.parse(out / "junit.xml").getroot()
    failures = {c.get("name"): c.find("failure") for c in suite.iter("testcase")}
    assert failures["throughput_tok_s"] is not None and failures["itl_ms_p99"] is None
    assert "1000000000.0 required" in failures["throughput_tok_s"].get("message")


def test_recipe_thresholds_and_flags_override(artifact, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("serve_test:\n  max_ppl_increase: -5\n  num_requests: 3\n  prompt_len: [8, 16]\n  output_len: 4:8\n")
    assert load_recipe(recipe).serve_test.prompt_len == (8, 16)
    args = [a for a in SMALL if a not in ("--num-requests", 6)]
    code, output = invoke(artifact, "-o", tmp_path / "a", "--recipe", recipe, *args, "--no-load")
    assert code == 1 and "ppl_increase_pct" in output  # an increase of about 0 is above -5
    code, output = invoke(artifact, "-o", tmp_path / "b", "--recipe", recipe, *args, "--no-load", "--max-ppl-increase", 1)
    assert code == 0, output


def test_poisson_arrivals_are_seeded(tmp_path):
    cfg = ServeTestConfig(num_requests=20, prompt_len=(4, 8), output_len=(2, 3), request_rate=10.0, seed=3)
    tokens = list(range(100))
    a, b = make_workload(tokens, cfg, 64), make_workload(tokens, cfg, 64)
    assert a == b and a[0][0] == 0 and all(x[0] < y[0] for x, y in zip(a, a[1:]))
    assert 0.5 < a[-1][0] / 1.9 < 2.0  # 19 gaps of mean 0.1 s
    with pytest.raises(InferkitError, match="serve_test.pdl must be true or false, got 'yes'"):
        ServeTestConfig(pdl="yes")
    with pytest.raises(InferkitError, match="exceeds max_model_len"):
        make_workload(tokens, cfg, 10)


def test_percentile_interpolates():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile(list(range(101)), 99) == 99


@pytest.mark.parametrize("args, message", [
    (["--prompt-len", "64:32"], "prompt_len"),
    (["--prompt-len", "200:300"], "exceeds max_model_len"),
    (["--num-kv-blocks", 2], "cannot hold one sequence"),
    (["--prompt-len", "x"], "--prompt-len must be MIN:MAX"),
    (["--pdl"], "pdl: programmatic dependent launches are the Triton matmul's, and the linear backend is packed"),
])
def test_bad_options_are_one_line_errors(artifact, tmp_path, args, message):
    code, output = invoke(artifact, "-o", tmp_path / "x", *SMALL, *args)
    assert code == 1 and message in output and "Traceback" not in output
    assert not (tmp_path / "x").exists()


def test_tampered_artifact_and_existing_output(artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    with open(bad / "model.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    code, output = invoke(bad, "-o", tmp_path / "x", *SMALL)
    assert code == 1 and "model.safetensors does not match its manifest hash" in output
    (tmp_path / "exists").mkdir()
    code, output = invoke(artifact, "-o", tmp_path / "exists", *SMALL)
    assert code == 1 and "--overwrite" in output


def test_plain_folder_against_another_reference(tiny_llama, tiny_llama_other, tmp_path):
    """A reference that is another model: the runtime's tokens no longer agree, and the check says so."""
    code, output = invoke(tiny_llama, "-o", tmp_path / "same", *SMALL, "--no-load")
    assert code == 0, output
    code, output = invoke(tiny_llama, "-o", tmp_path / "other", *SMALL, "--no-load", "--reference", tiny_llama_other)
    assert code == 1 and "agreement" in output
    report = json.loads((tmp_path / "other" / "report.json").read_text())
    assert report["quality"]["reference"] == str(tiny_llama_other) and report["quality"]["agreement"] < 0.5


def test_speculative_serve_test_reports_acceptance(artifact, tmp_path):
    """The artifact as its own draft: every draft accepted, the same greedy tokens."""
    out = tmp_path / "st"
    code, output = invoke(artifact, "-o", out, *SMALL, "--no-quality", "--draft", artifact, "--num-speculative-tokens", 3)
    assert code == 0, output
    sp = json.loads((out / "report.json").read_text())["speculative"]
    assert sp["greedy_equal_plain"] and sp["acceptance_rate"] == 1.0 and sp["acceptance_by_position"] == [1.0, 1.0, 1.0]
    assert sp["tokens_per_step"] > 3.5
    suite = ET.parse(out / "junit.xml").getroot()
    assert "speculative_greedy_equal_plain" in [c.get("name") for c in suite.iter("testcase")]


def test_a_packed_artifact_brings_its_draft(artifact, tmp_path):
    from inferkit.stages.pack import pack

    packed = tmp_path / "packed"
    pack(artifact, packed, draft=artifact)  # the artifact as its own draft: every token accepted
    code, output = invoke(packed, "-o", tmp_path / "st", *SMALL, "--no-quality")
    assert code == 0, output
    report = json.loads((tmp_path / "st" / "report.json").read_text())
    assert report["speculative"]["acceptance_rate"] == 1.0 and report["speculative"]["greedy_equal_plain"]
    code, output = invoke(packed, "-o", tmp_path / "st2", *SMALL, "--no-quality", "--no-draft")
    assert code == 0 and "speculative" not in json.loads((tmp_path / "st2" / "report.json").read_text())
