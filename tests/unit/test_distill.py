"""Distillation: the losses, the schedule, a short run end to end, checkpoints and resume."""

import json

import pytest
import torch

from inferkit.errors import InferkitError
from inferkit.stages.distill import DistillConfig, distill_loss, lr_at, run_distill

CFG = dict(steps=12, num_samples=16, seq_len=32, batch_size=4, calibration="seed", warmup=2, lr=1e-3)


def test_losses_are_divergences():
    torch.manual_seed(0)
    t, s = torch.randn(6, 10), torch.randn(6, 10)
    for loss in ("fkl", "rkl", "jsd", "tvd"):
        assert float(distill_loss(t, t, loss)) == pytest.approx(0, abs=1e-6)
        assert float(distill_loss(s, t, loss)) > 0.01
    p_t, p_s = torch.softmax(t, -1), torch.softmax(s, -1)
    fkl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert float(distill_loss(s, t, "fkl")) == pytest.approx(float(fkl), rel=1e-5)
    assert float(distill_loss(s, t, "rkl")) == pytest.approx(float(distill_loss(t, s, "fkl")), rel=1e-5)
    assert float(distill_loss(s, t, "tvd")) == pytest.approx(float(0.5 * (p_t - p_s).abs().sum(-1).mean()), rel=1e-5)
    assert float(distill_loss(s, t, "jsd", beta=0.5)) == pytest.approx(float(distill_loss(t, s, "jsd", beta=0.5)), rel=1e-5)
    assert float(distill_loss(s, t, "jsd")) <= 0.6932  # bounded by log 2
    top = t.topk(4, -1)  # the top-k path: both distributions over the teacher's k tokens
    restricted = distill_loss(s.gather(-1, top.indices), top.values, "fkl")
    assert float(distill_loss(s, top.values, "fkl", teacher_index=top.indices)) == pytest.approx(float(restricted))


def test_warmup_then_cosine():
    cfg = DistillConfig(steps=100, warmup=10, lr=1.0)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.5) and lr_at(100, cfg) == pytest.approx(0.0)


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "tvd"])
def test_short_run_lowers_the_loss(tiny_model_factory, tmp_path, loss):
    teacher = tiny_model_factory("t", num_hidden_layers=4)
    cfg = DistillConfig(loss=loss, **CFG, train_embeddings=True)
    report = run_distill(str(teacher), tmp_path / "out", cfg, student_layers=2)
    losses = [c["loss"] for c in report["loss_curve"]]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert json.loads((tmp_path / "out" / "distill.json").read_text())["config"]["loss"] == loss
    assert not (tmp_path / ".out.partial").exists()


def test_resume_continues_and_refuses_another_run(tiny_model_factory, tmp_path, monkeypatch):
    teacher = tiny_model_factory("t", num_hidden_layers=4)
    cfg = DistillConfig(**CFG, checkpoint_every=6)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_after_eight(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 8:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_after_eight)
    with pytest.raises(KeyboardInterrupt):
        run_distill(str(teacher), tmp_path / "out", cfg, student_layers=2)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    ckpt = tmp_path / ".out.partial" / "checkpoint-6"
    assert (ckpt / "trainer.json").is_file() and not (tmp_path / "out").exists()
    with pytest.raises(InferkitError, match="different run"):
        run_distill(str(teacher), tmp_path / "out", DistillConfig(**{**CFG, "lr": 5e-4}, checkpoint_every=6),
                    student_layers=2, resume=ckpt)
    report = run_distill(str(teacher), tmp_path / "out", cfg, student_layers=2, resume=ckpt)
    assert [c["step"] for c in report["loss_curve"]] == list(range(1, 13))
    straight = run_distill(str(teacher), tmp_path / "straight", cfg, student_layers=2)
    # Same batches, weights and optimizer state after the resume: the same losses.
    assert [c["loss"] for c in report["loss_curve"]] == pytest.approx([c["loss"] for c in straight["loss_curve"]], rel=1e-5)


def test_bad_inputs(tiny_model_factory, tmp_path):
    teacher = tiny_model_factory("t")
    other = tiny_model_factory("o", vocab_size=200)
    with pytest.raises(InferkitError, match="student's vocabulary has 200 tokens, the teacher's 384"):
        run_distill(str(teacher), tmp_path / "x", DistillConfig(**CFG), student=str(other))
    with pytest.raises(InferkitError, match="exactly one of"):
        run_distill(str(teacher), tmp_path / "x", DistillConfig(**CFG))
    for kwargs, msg in [(dict(loss="kl"), "unknown loss"), (dict(beta=1.0), "beta"), (dict(top_k=1), "top_k"),
                        (dict(on_policy=2.0), "on_policy"), (dict(temperature=0), "temperature")]:
        with pytest.raises(InferkitError, match=msg):
            DistillConfig(**kwargs)


def test_on_policy_steps_use_the_students_continuations(tiny_model_factory, tmp_path, monkeypatch):
    teacher = tiny_model_factory("t", num_hidden_layers=4)
    from transformers import LlamaForCausalLM

    generated = []
    real = LlamaForCausalLM.generate

    def spy(self, *a, **k):
        out = real(self, *a, **k)
        generated.append(out.shape)
        return out

    monkeypatch.setattr(LlamaForCausalLM, "generate", spy)
    report = run_distill(str(teacher), tmp_path / "out", DistillConfig(**CFG, on_policy=1.0, on_policy_tokens=8),
                         student_layers=2)
    assert len(generated) == 12 and all(s == (4, 32) for s in generated)
    assert all(c["loss"] == c["loss"] for c in report["loss_curve"])  # finite, not NaN


def test_cli_runs_and_errors_are_one_line(tiny_model_factory, tmp_path):
    from typer.testing import CliRunner

    from inferkit.cli.main import app

    teacher = tiny_model_factory("t", num_hidden_layers=4)
    run = lambda *a: CliRunner().invoke(app, ["distill", *map(str, a)])  # noqa: E731
    result = run("--teacher", tmp_path / "missing", "--student-layers", 2, "-o", tmp_path / "x")
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output
    result = run("--teacher", teacher, "--student-layers", 2, "-o", tmp_path / "d", "--steps", 4, "--num-samples", 8,
                 "--seq-len", 32, "--calibration", "seed", "--eval-prompts", 2)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d" / "distill.json").read_text())
    assert report["steps_done"] == 4 and report["acceptance_before"]["speculative_steps"] > 0
    result = run("--teacher", teacher, "--student-layers", 2, "-o", tmp_path / "d", "--steps", 4)
    assert result.exit_code == 1 and "--overwrite" in result.output
