"""inferkit run: the whole pipeline on a tiny model, cached stages, resume after an interrupted
quantize with the same bytes as an uninterrupted run, --from/--only, bad recipes."""

import json

import pytest
import yaml

from inferkit.errors import InferkitError
from inferkit.stages.pipeline import run_pipeline
from inferkit.stages.verify import verify_artifact

DETERMINISTIC = ["model.safetensors", "config.json", "tokenizer.json", "draft/model.safetensors", "draft/config.json",
                 "draft/draft_vocab.safetensors"]


def write_recipe(path, model, **extra):
    recipe = {
        "name": "tiny-pipeline", "model": str(model),
        "quantize": {"method": "gptq", "bits": 4, "group_size": 32, "batch_size": 4},
        "calibration": {"source": "seed", "num_samples": 4, "seq_len": 32},
        "distill": {"student_layers": 1, "steps": 4, "num_samples": 8, "seq_len": 32, "calibration": "seed",
                    "top_k": 16, "warmup": 1, "draft_vocab": 128},
        "serve_test": {"num_requests": 4, "prompt_len": [8, 16], "output_len": [4, 8], "windows": 2, "window_size": 32,
                       "max_model_len": 128, "num_kv_blocks": 40, "agreement_prompts": 2, "agreement_tokens": 4,
                       "min_agreement": 0.5, "max_ppl_increase": 5.0},
        "pack": {"archive": True},
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_full_run_then_cached_rerun(tiny_llama, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama)
    calls = []
    summary = run_pipeline(recipe, tmp_path / "work", tmp_path / "final",
                           progress=lambda done, total, label: calls.append((done, total, label)))
    assert calls and all(isinstance(d, int) and isinstance(t, (int, type(None))) and isinstance(lbl, str)
                         for d, t, lbl in calls)  # every stage reports (done, total, label)
    assert [s.stage for s in summary.stages] == ["calibrate", "quantize", "distill", "serve-test", "pack"]
    assert all(s.status == "ran" for s in summary.stages) and summary.passed
    assert verify_artifact(tmp_path / "final").ok and list(tmp_path.glob("final.tar*"))
    assert json.loads((tmp_path / "final" / "reports" / "serve-test.json").read_text())["speculative"]["greedy_equal_plain"]
    again = run_pipeline(recipe, tmp_path / "work")
    assert all(s.status == "cached" for s in again.stages)
    assert json.loads((tmp_path / "work" / "run-summary.json").read_text())["passed"] is True
    only = run_pipeline(recipe, tmp_path / "work", only="serve-test")
    assert [s.status for s in only.stages] == ["cached", "cached", "cached", "ran", "cached"]
    frm = run_pipeline(recipe, tmp_path / "work", from_stage="distill", overwrite=True)
    assert [s.status for s in frm.stages] == ["cached", "cached", "ran", "ran", "ran"]
    # a changed quantize setting keys new quantize/serve-test/pack folders, keeps calibrate and distill
    changed = run_pipeline(write_recipe(tmp_path / "r2.yaml", tiny_llama,
                                        quantize={"method": "rtn", "bits": 4, "group_size": 32}), tmp_path / "work")
    assert [s.status for s in changed.stages] == ["cached", "ran", "cached", "ran", "ran"]


def test_interrupted_quantize_resumes_with_the_same_bytes(tiny_llama, tmp_path, monkeypatch):
    import inferkit.stages.quantize as quantize_mod

    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama)
    straight = run_pipeline(recipe, tmp_path / "w1")
    real = quantize_mod.run_quantize

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a SIGTERM would stop it, in the middle of the stage

    monkeypatch.setattr(quantize_mod, "run_quantize", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(recipe, tmp_path / "w2")
    assert {p.name.split("-")[0] for p in (tmp_path / "w2").iterdir() if p.is_dir()} == {"calibrate"}
    monkeypatch.setattr(quantize_mod, "run_quantize", real)
    resumed = run_pipeline(recipe, tmp_path / "w2")
    assert [s.status for s in resumed.stages] == ["cached", "ran", "ran", "ran", "ran"]
    a, b = tmp_path / "w1" / straight.stages[-1].output.split("/")[-1], tmp_path / "w2" / resumed.stages[-1].output.split("/")[-1]
    for name in DETERMINISTIC:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_bad_recipes_and_options(tiny_llama, tmp_path):
    no_model = tmp_path / "n.yaml"
    no_model.write_text("quantize: {bits: 4}\n")
    with pytest.raises(InferkitError, match="names no model"):
        run_pipeline(no_model, tmp_path / "w")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama)
    with pytest.raises(InferkitError, match="--from sensitivity-scan: this recipe's stages are calibrate, quantize"):
        run_pipeline(recipe, tmp_path / "w", from_stage="sensitivity-scan")
    with pytest.raises(InferkitError, match="needs the calibrate stage's output"):
        run_pipeline(recipe, tmp_path / "w", only="quantize")
    bad = tmp_path / "b.yaml"
    bad.write_text(yaml.safe_dump({"model": str(tiny_llama), "distill": {"lossy": 1}}))
    from typer.testing import CliRunner

    from inferkit.cli.main import app

    result = CliRunner().invoke(app, ["run", str(bad), "--work", str(tmp_path / "w")])
    assert result.exit_code == 1 and "unknown key b.yaml.distill.lossy" in result.output and "Traceback" not in result.output


def test_sigterm_then_sigkill_in_quantize_resumes_at_quantize(tiny_llama, tmp_path):
    """A real `inferkit run` process stopped by SIGTERM, then SIGKILL, while quantize is writing:
    the rerun skips calibrate, redoes quantize and ends with the same weights and draft bytes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama)
    straight = run_pipeline(recipe, tmp_path / "w1")
    work = tmp_path / "w2"
    env = {**os.environ, "INFERKIT_TEST_SLOW_QUANTIZE": "1"}  # quantize waits inside its temp folder
    proc = subprocess.Popen([sys.executable, "-m", "inferkit", "run", str(recipe), "--work", str(work)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob(".quantize-*.tmp-*")):
        time.sleep(0.2)
    assert list(work.glob(".quantize-*.tmp-*")), "quantize never started"
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert not list(work.glob("quantize-*"))  # nothing half-written looks finished
    resumed = run_pipeline(recipe, work)
    assert [s.status for s in resumed.stages] == ["cached", "ran", "ran", "ran", "ran"]
    a = tmp_path / "w1" / straight.stages[-1].output.split("/")[-1]
    b = work / resumed.stages[-1].output.split("/")[-1]
    for name in DETERMINISTIC:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
