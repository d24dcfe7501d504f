"""The command line: help, version, and one-line errors with non-zero exit codes."""

import json

import pytest
from typer.testing import CliRunner

from inferkit import __version__
from inferkit.cli.main import app

runner = CliRunner()
MISSION = ["calibrate", "sensitivity-scan", "quantize", "distill", "pack", "serve-test", "run", "eval", "demo", "models", "verify",
           "tune-kernels"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code, output, text):
    assert code == 1, output
    assert text in output
    assert "Traceback" not in output
    assert output.strip().startswith("error:")


def test_help_lists_every_command():
    code, out = invoke("--help")
    assert code == 0
    for name in MISSION:
        assert name in out


def test_version():
    assert invoke("--version") == (0, f"inferkit {__version__}\n")


def test_missing_path(tmp_path):
    assert_one_line_error(*invoke("quantize", tmp_path / "none", "-o", tmp_path / "o"), "does not exist")


def test_not_a_model_folder(tmp_path):
    (tmp_path / "m").mkdir()
    assert_one_line_error(*invoke("quantize", tmp_path / "m", "-o", tmp_path / "o"), "is not a model folder")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_one_line_error(*invoke("quantize", tmp_path / "m", "-o", tmp_path / "o"), "unsupported architecture 'bert'")


def test_unknown_recipe_key(tiny_llama, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("quantize:\n  bits: 4\n  colour: blue\n")
    assert_one_line_error(*invoke("quantize", tiny_llama, "--recipe", r, "-o", tmp_path / "o"), "unknown key r.yaml.quantize.colour")


def test_group_size_that_does_not_divide(tiny_llama, tmp_path):
    code, out = invoke("quantize", tiny_llama, "--method", "rtn", "--group-size", "64", "-o", tmp_path / "o")
    assert_one_line_error(code, out, "group size 64 does not divide model.layers.0.mlp.down_proj's input dimension 96")
    assert "[32]" in out


def test_output_exists_needs_overwrite(tiny_llama, tmp_path):
    (tmp_path / "o").mkdir()
    assert_one_line_error(*invoke("quantize", tiny_llama, "--method", "rtn", "--group-size", "32", "-o", tmp_path / "o"), "pass --overwrite")


def test_bad_override_flag(tiny_llama, tmp_path):
    code, out = invoke("quantize", tiny_llama, "--override", "down_proj", "-o", tmp_path / "o")
    assert_one_line_error(code, out, "must look like PATTERN=FORMAT")


def test_interrupted_quantize_exits_130_and_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    import inferkit.stages.artifact as artifact

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifact, "write_manifest", interrupt)
    code, out = invoke("quantize", tiny_llama, "--method", "rtn", "--group-size", "32", "-o", tmp_path / "o")
    assert code == 130 and "interrupted" in out
    assert list(tmp_path.iterdir()) == []


def test_debug_variable_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERKIT_DEBUG", "1")
    result = runner.invoke(app, ["quantize", str(tmp_path / "none"), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert type(result.exception).__name__ == "InferkitError"


def test_quantize_calibrate_eval_flow(tiny_llama, tmp_path, seed_text_file):
    code, out = invoke("calibrate", tiny_llama, "--calibration", "seed", "--num-samples", 4, "--seq-len", 32,
                       "-o", tmp_path / "stats", "--json", tmp_path / "calib.json")
    assert code == 0, out
    assert json.loads((tmp_path / "calib.json").read_text())["num_tokens"] == 128
    code, out = invoke("quantize", tiny_llama, "--stats", tmp_path / "stats", "--group-size", 32, "--asymmetric",
                       "-o", tmp_path / "art", "--json", tmp_path / "q.json")
    assert code == 0, out
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["bits_per_weight"] == pytest.approx(5.125)
    code, out = invoke("eval", tmp_path / "art", "--text", seed_text_file, "--window-size", 32, "--windows", 3,
                       "--reference", tiny_llama, "--json", tmp_path / "e.json")
    assert code == 0, out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["tokens"] == 3 * 31
    assert result["kl_divergence"] > 0 and 0 < result["top1_agreement"] <= 1
    assert "perplexity" in out


def test_eval_needs_exactly_one_text(tiny_llama, tmp_path):
    assert_one_line_error(*invoke("eval", tiny_llama), "exactly one of --text")


def test_eval_too_few_tokens(tiny_llama, tmp_path):
    t = tmp_path / "t.txt"
    t.write_text("short text")
    assert_one_line_error(*invoke("eval", tiny_llama, "--text", t, "--windows", 5), "room for 0 windows")


def test_sigterm_exits_cleanly_without_output(tiny_llama, tmp_path):
    """A real SIGTERM mid-run: exit code 130, one line, no output folder, no temp folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "o"
    # 8000 x 256 tokens: ~500 MB of activations at hidden 64, and tens of seconds of work.
    cmd = [sys.executable, "-c", "from inferkit.cli.main import main; main()", "quantize", str(tiny_llama),
           "--group-size", "32", "--calibration", "pydoc", "--num-samples", "8000", "--seq-len", "256", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "INFERKIT_PROGRESS": "0"})

    def rss_mb() -> int:
        status = open(f"/proc/{proc.pid}/status").read()
        return int(status.split("VmRSS:")[1].split()[0]) // 1024 if "VmRSS:" in status else 0

    deadline = time.time() + 120
    while rss_mb() < 600 and time.time() < deadline:  # calibration activations are being built
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_folder_of_a_killed_run_is_cleared(tiny_llama, tmp_path):
    stale = tmp_path / ".o.tmp-999999999"  # no such process
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    code, out = invoke("quantize", tiny_llama, "--method", "rtn", "--group-size", "32", "-o", tmp_path / "o")
    assert code == 0, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


SCAN_FLAGS = ["--calibration", "seed", "--num-samples", "8", "--seq-len", "64", "--eval-samples", "2", "--eval-seq-len", "64"]


def test_scan_plan_quantize_flow(tiny_llama, tmp_path):
    code, out = invoke("sensitivity-scan", tiny_llama, "-o", tmp_path / "scan", "--formats", "int8-ch,int4-g32",
                       "--json", tmp_path / "scan.json", *SCAN_FLAGS)
    assert code == 0, out
    assert "most sensitive units" in out and "L0 attn.qkv_proj" in out
    scan = json.loads((tmp_path / "scan.json").read_text())
    assert len(scan["units"]) == 8 and scan["timings_s"]["total"] > 0
    code, out = invoke("plan", tmp_path / "scan", "--target-bpw", "6.5", "-o", tmp_path / "plan.json")
    assert code == 0, out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["bits_per_weight"] <= 6.5 and set(plan["format_counts"]) == {"int8-ch-sym", "int4-g32-sym"}
    code, out = invoke("quantize", tiny_llama, "-o", tmp_path / "q", "--plan", tmp_path / "plan.json",
                       "--calibration", "seed", "--num-samples", "8", "--seq-len", "64")
    assert code == 0, out
    assert json.loads((tmp_path / "q" / "inferkit.json").read_text())["bits_per_weight"] == round(plan["bits_per_weight"], 4)
    code, out = invoke("plan", tmp_path / "scan", "--target-bpw", "3", "-o", tmp_path / "p2.json")
    assert_one_line_error(code, out, "below the smallest plan")
    code, out = invoke("plan", tmp_path / "scan", "--target-bpw", "6.5", "-o", tmp_path / "plan.json")
    assert_one_line_error(code, out, "already exists")
    code, out = invoke("quantize", tiny_llama, "-o", tmp_path / "q2", "--plan", tmp_path / "plan.json", "--target-bpw", "5")
    assert_one_line_error(code, out, "--plan already fixes every layer's format")
    assert not (tmp_path / "q2").exists()


def test_scan_bad_input(tiny_llama, tmp_path):
    code, out = invoke("sensitivity-scan", tiny_llama, "-o", tmp_path / "s", "--mode", "hessian")
    assert_one_line_error(code, out, "unknown scan mode 'hessian'")
    code, out = invoke("plan", tmp_path / "nothing", "--target-bpw", "4", "-o", tmp_path / "p.json")
    assert_one_line_error(code, out, "no sensitivity scan at")
    code, out = invoke("quantize", tiny_llama, "-o", tmp_path / "q", "--scan", tmp_path / "nothing")
    assert_one_line_error(code, out, "--scan needs a target")
