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
    import inferkit.stages.distill as distill

    teacher = tiny_model_factory("t", num_hidden_layers=4)
    generated = []
    real = distill.sample_continuation

    def spy(*a, **k):
        out = real(*a, **k)
        generated.append(out)
        return out

    monkeypatch.setattr(distill, "sample_continuation", spy)
    report = run_distill(str(teacher), tmp_path / "out", DistillConfig(**CFG, on_policy=1.0, on_policy_tokens=8),
                         student_layers=2)
    assert len(generated) == 12 and all(g.shape == (4, 32) for g in generated)
    assert all(c["loss"] == c["loss"] for c in report["loss_curve"])  # finite, not NaN


def test_sample_continuation_matches_transformers_greedy_with_its_cache(tiny_model_factory):
    """The student's sampler (KV cache, draft ids mapped to target ids) at a near-zero
    temperature picks what generate() picks greedily."""
    from transformers import AutoModelForCausalLM

    from inferkit.stages.distill import make_student, sample_continuation

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("t"), dtype=torch.float32)
    prefix = torch.tensor([[5, 9, 11, 40], [7, 7, 3, 100]])
    want = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=False, max_new_tokens=6)

    class Sharp(torch.nn.Module):  # logits x 1e4: sampling becomes argmax
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, past_key_values=None, use_cache=False):
            logits, past = self.inner(ids, past_key_values=past_key_values, use_cache=use_cache)
            return logits * 1e4, past

    got = sample_continuation(Sharp(make_student(model, None)), None, prefix, 6, torch.Generator().manual_seed(0))
    assert torch.equal(got, want)
    d2t = torch.arange(0, 384, 2)  # even ids only: every sampled token is an even target id
    got = sample_continuation(make_student(model, d2t), d2t, prefix, 6, torch.Generator().manual_seed(0))
    assert got.shape == (2, 10) and bool((got[:, 4:] % 2 == 0).all())


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


def test_two_processes_under_accelerate_launch_match_one(tiny_model_factory, tmp_path):
    """Data parallel over two CPU processes (gloo): each takes half of every batch and the
    gradients are averaged, so the run follows the one-process run with the same global batch."""
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert launcher, "accelerate's launcher is installed with the package"
    teacher = tiny_model_factory("t", num_hidden_layers=4)
    cfg = DistillConfig(**CFG, checkpoint_every=6, draft_vocab=200)
    one = run_distill(str(teacher), tmp_path / "one", cfg, student_layers=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "inferkit", "distill",
            "--teacher", str(teacher), "--student-layers", "2", "-o", str(tmp_path / "two"), "--steps", "12",
            "--num-samples", "16", "--seq-len", "32", "--batch-size", "4", "--calibration", "seed", "--warmup", "2",
            "--lr", "1e-3", "--checkpoint-every", "6", "--draft-vocab", "200", "--eval-prompts", "0"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "distill.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1 and two["steps_done"] == 12
    assert [c["loss"] for c in two["loss_curve"]] == pytest.approx([c["loss"] for c in one["loss_curve"]], rel=1e-4)
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert torch.equal(load_file(str(tmp_path / "two" / "draft_vocab.safetensors"))["d2t"],
                       load_file(str(tmp_path / "one" / "draft_vocab.safetensors"))["d2t"])
    # an odd batch cannot be split evenly
    result = subprocess.run(args[:-2] + ["--batch-size", "3", "--overwrite"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode != 0 and "must be divisible by the 2 processes" in result.stdout + result.stderr


def test_a_process_group_the_caller_opened_stays_open(tiny_model_factory, tmp_path):
    """run_distill closes only a process group it opened (an accelerate launch's): a library caller's
    own group (here a one-process gloo group) is still usable afterwards."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        teacher = tiny_model_factory("t", num_hidden_layers=4)
        report = run_distill(str(teacher), tmp_path / "d", DistillConfig(**{**CFG, "steps": 2}), student_layers=2)
        assert report["steps_done"] == 2 and report["processes"] == 1
        assert dist.is_initialized()
        t = torch.ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_reduced_draft_vocabulary_is_trained_and_exported(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from inferkit.runtime import LLM, SamplingParams
    from inferkit.stages.distill import select_draft_vocab

    counts = torch.tensor([5, 0, 9, 9, 1, 0])
    assert select_draft_vocab(counts, 3).tolist() == [0, 2, 3]  # most frequent, ties by id
    assert select_draft_vocab(counts, 3, always=[5]).tolist() == [2, 3, 5]
    with pytest.raises(InferkitError, match="between 2 and the vocabulary size 6"):
        select_draft_vocab(counts, 7)

    teacher = tiny_model_factory("t", num_hidden_layers=4)
    report = run_distill(str(teacher), tmp_path / "out", DistillConfig(**CFG, draft_vocab=100), student_layers=2,
                         eval_prompts=2)
    losses = [c["loss"] for c in report["loss_curve"]]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert report["draft_vocab"]["size"] == 100 and 0.5 < report["draft_vocab"]["coverage"] <= 1.0
    assert report["acceptance_before"]["speculative_steps"] > 0
    d2t = load_file(str(tmp_path / "out" / "draft_vocab.safetensors"))["d2t"]
    assert len(d2t) == 100 and bool((d2t[1:] > d2t[:-1]).all())
    # A plain HF load: an untied full head, trained rows on the draft's tokens, the rest as before.
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert draft.config.tie_word_embeddings is False
    head, embed = draft.lm_head.weight, draft.model.embed_tokens.weight
    others = torch.ones(384, dtype=torch.bool)
    others[d2t] = False
    assert torch.equal(head[others], embed[others]) and not torch.equal(head[d2t], embed[d2t])
    llm = LLM(teacher, draft=str(tmp_path / "out"), num_speculative_tokens=3)
    assert llm.engine.draft.lm_head.out_features == 100
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in llm.generate([[5, 6, 7], [40, 41]], greedy)] == \
        [o.token_ids for o in LLM(teacher).generate([[5, 6, 7], [40, 41]], greedy)]
    with pytest.raises(InferkitError, match="--draft-vocab 500 is larger than the teacher's vocabulary"):
        run_distill(str(teacher), tmp_path / "x", DistillConfig(**CFG, draft_vocab=500), student_layers=2)


def test_teacher_cache_is_shared_through_cache_dir(tiny_model_factory, tmp_path, monkeypatch):
    import inferkit.stages.distill as distill

    teacher = tiny_model_factory("t", num_hidden_layers=4)
    cache = tmp_path / "cache"
    generated = []
    real = distill.teacher_continuations
    monkeypatch.setattr(distill, "teacher_continuations", lambda *a, **k: generated.append(1) or real(*a, **k))
    cfg = dict(CFG, teacher_data=0.5, teacher_data_tokens=8)
    run_distill(str(teacher), tmp_path / "a", DistillConfig(**cfg, loss="fkl"), student_layers=2, cache_dir=cache)
    files = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
    assert len(files) == 2 and generated == [1]  # windows (half continued by the teacher) + top-k logits
    windows = next(f for f in cache.iterdir() if f.name.startswith("windows"))
    from safetensors.torch import load_file

    ids = load_file(str(windows))["ids"]
    assert ids.shape == (16, 32)
    run_distill(str(teacher), tmp_path / "b", DistillConfig(**cfg, loss="tvd"), student_layers=2, cache_dir=cache)
    assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == files and generated == [1]  # reused
    run_distill(str(teacher), tmp_path / "c", DistillConfig(**{**cfg, "seed": 1}), student_layers=2, cache_dir=cache)
    assert len(list(cache.iterdir())) == 4 and generated == [1, 1]  # other data: its own files
