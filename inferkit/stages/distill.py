"""Draft models for speculative decoding. This release builds the student side: a shallow
student cut from the teacher (``--student-layers N``); training it is the next step."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from inferkit.errors import InferkitError


def student_layer_indices(num_teacher_layers: int, num_layers: int) -> list[int]:
    """``num_layers`` teacher layers, evenly spaced from the first, always ending with the last."""
    if not 1 <= num_layers <= num_teacher_layers:
        raise InferkitError(f"--student-layers must be between 1 and the teacher's {num_teacher_layers}, got {num_layers}")
    if num_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    return sorted({round(i * step) for i in range(num_layers)})


def build_student(teacher: str | Path, num_layers: int, out: Path, overwrite: bool = False) -> Path:
    """A student with ``num_layers`` of the teacher's decoder layers, and its embeddings, final
    norm and head, written as a Hugging Face folder with the teacher's tokenizer."""
    import torch

    from inferkit.artifacts import atomic_output_dir
    from inferkit.models import load_model

    loaded = load_model(teacher)
    model = loaded.model
    keep = student_layer_indices(model.config.num_hidden_layers, num_layers)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "student.json").write_text(json.dumps({"teacher": loaded.source.display, "teacher_layers_kept": keep}) + "\n")
    return out


# -- distillation ---------------------------------------------------------------------------------
LOSSES = ("fkl", "rkl", "jsd", "tvd")


def distill_loss(student_logits, teacher_logits, loss: str, temperature: float = 1.0, beta: float = 0.5,
                 teacher_index=None):
    """Mean per-token divergence between teacher and student next-token distributions.

    ``fkl``: KL(teacher ‖ student); ``rkl``: KL(student ‖ teacher); ``jsd``: generalised
    Jensen-Shannon with mixture m = β·teacher + (1-β)·student, β·KL(t‖m) + (1-β)·KL(s‖m);
    ``tvd``: total variation ½·Σ|t - s|. With ``teacher_index`` [N, k] the teacher logits are its
    top k (``teacher_logits`` [N, k]) and both distributions are taken over those k tokens.
    """
    import torch
    import torch.nn.functional as F

    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if teacher_index is not None:
        s = s.gather(-1, teacher_index)
    log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if loss == "fkl":
        per = (p_t * (log_t - log_s)).sum(-1)
    elif loss == "rkl":
        per = (p_s * (log_s - log_t)).sum(-1)
    elif loss == "jsd":
        log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), 0)
        per = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    elif loss == "tvd":
        per = 0.5 * (p_t - p_s).abs().sum(-1)
    else:
        raise InferkitError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    return per.mean()


@dataclass(frozen=True, slots=True)
class DistillConfig:
    loss: str = "fkl"
    beta: float = 0.5  # jsd mixture weight of the teacher
    temperature: float = 1.0
    top_k: int | None = 64  # teacher logits kept per token (None: the full vocabulary)
    steps: int = 300
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 20
    weight_decay: float = 0.0
    seq_len: int = 128
    num_samples: int = 512
    calibration: str = "builtin"
    seed: int = 0
    on_policy: float = 0.0  # fraction of steps trained on the student's own continuations
    on_policy_tokens: int = 32
    train_embeddings: bool = False
    dtype: str = "float32"  # or bfloat16 (autocast)
    checkpoint_every: int = 0
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InferkitError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if not 0 < self.beta < 1:
            raise InferkitError(f"beta must be in (0, 1), got {self.beta}")
        if self.temperature <= 0:
            raise InferkitError(f"temperature must be positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 2:
            raise InferkitError(f"top_k must be at least 2, got {self.top_k}")
        for name in ("steps", "batch_size", "grad_accum", "num_samples"):
            if getattr(self, name) < 1:
                raise InferkitError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.on_policy <= 1:
            raise InferkitError(f"on_policy must be in [0, 1], got {self.on_policy}")
        if self.dtype not in ("float32", "bfloat16"):
            raise InferkitError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def acceptance_rate(teacher: Path, draft: Path, prompts: list[list[int]], k: int = 4, new_tokens: int = 48) -> dict:
    """Greedy speculative acceptance of ``draft`` for ``teacher`` on held-out prompts."""
    from transformers import AutoConfig

    from inferkit.runtime import LLM, SamplingParams

    context = min(1024, AutoConfig.from_pretrained(teacher).max_position_embeddings)
    llm = LLM(teacher, draft=str(draft), num_speculative_tokens=k, kv_cache_gb=0.5, max_model_len=context)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    return llm.engine.spec_runner.stats.summary()


def _optimizer_state(opt, params) -> dict:
    tensors = {}
    for i, p in enumerate(params):
        state = opt.state.get(p, {})
        for key, value in state.items():
            tensors[f"{i}.{key}"] = value.detach().cpu().reshape(-1) if value.dim() == 0 else value.detach().cpu()
    return tensors


def _load_optimizer_state(opt, params, tensors: dict) -> None:
    for i, p in enumerate(params):
        state = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if f"{i}.{key}" in tensors:
                value = tensors[f"{i}.{key}"]
                state[key] = value.reshape(()) if key == "step" else value.to(p.device)
        if state:
            opt.state[p] = state


def run_distill(teacher: str, out: Path, cfg: DistillConfig, student: str | None = None,
                student_layers: int | None = None, resume: Path | None = None, overwrite: bool = False,
                eval_prompts: int = 0, log=lambda msg: None, progress=None) -> dict:
    """Train a draft on the teacher's next-token distributions; write an HF folder + distill.json.
    ``eval_prompts``: held-out prompts (the built-in held-out split, 48 tokens each) on which the
    greedy acceptance at k=4 is measured before and after."""
    import shutil
    import time

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from inferkit.artifacts import check_output_dir, move_into_place, write_json
    from inferkit.data.calibration import CalibrationConfig, build_samples
    from inferkit.models import load_model

    if (student is None) == (student_layers is None):
        raise InferkitError("pass exactly one of --student FOLDER or --student-layers N")
    check_output_dir(out, overwrite or resume is not None)
    work = out.parent / f".{out.name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    teacher_loaded = load_model(teacher)
    tok = teacher_loaded.tokenizer
    teacher_model = teacher_loaded.model
    init = work / "student-init"
    if not init.exists():
        if student_layers is not None:
            build_student(teacher, student_layers, init)
        else:
            shutil.copytree(Path(student).expanduser(), init)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    if model.config.vocab_size != teacher_model.config.vocab_size:
        raise InferkitError(f"the student's vocabulary has {model.config.vocab_size} tokens, the teacher's "
                            f"{teacher_model.config.vocab_size}: the draft must share the teacher's tokenizer")
    fingerprint = {"teacher": str(teacher), "student": str(student), "student_layers": student_layers,
                   "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in ("steps", "max_minutes", "checkpoint_every")}}
    torch.manual_seed(cfg.seed)
    samples = build_samples(CalibrationConfig(source=cfg.calibration, num_samples=cfg.num_samples,
                                              seq_len=cfg.seq_len, seed=cfg.seed), tok)
    if not cfg.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        if model.get_output_embeddings() is not None:
            model.get_output_embeddings().weight.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_step, curve = 0, []
    if resume is not None:
        state_file = Path(resume) / "trainer.json"
        if not state_file.is_file():
            raise InferkitError(f"{resume} is not a distill checkpoint (no trainer.json)")
        state = json.loads(state_file.read_text())
        if state["fingerprint"] != json.loads(json.dumps(fingerprint)):
            raise InferkitError(f"checkpoint {resume} is from a different run (other teacher, student or settings)")
        model.load_state_dict(load_file(str(Path(resume) / "student.safetensors")), strict=False)
        _load_optimizer_state(opt, params, load_file(str(Path(resume) / "optimizer.safetensors")))
        start_step, curve = state["step"], state["curve"]
        log(f"resuming from step {start_step}")
    # Teacher top-k logits, computed once for every window: epochs then skip the teacher.
    cache = work / f"teacher-top{cfg.top_k}.safetensors"
    t_cache = time.perf_counter()
    if cfg.top_k and cache.is_file():
        cached = load_file(str(cache))
    elif cfg.top_k:
        vals, idx = [], []
        with torch.no_grad():
            for i, batch in enumerate(samples.split(cfg.batch_size)):
                top = teacher_model(input_ids=batch).logits.topk(cfg.top_k, dim=-1)
                vals.append(top.values.to(torch.bfloat16))
                idx.append(top.indices.to(torch.int32))
                if progress:
                    progress(i + 1, -(-len(samples) // cfg.batch_size), "teacher logits")
        cached = {"values": torch.cat(vals), "indices": torch.cat(idx)}
        save_file(cached, str(cache))
    else:
        cached = None
    cache_seconds = time.perf_counter() - t_cache
    heldout = None
    if eval_prompts:
        heldout = build_samples(CalibrationConfig(source="builtin", split="heldout", num_samples=eval_prompts,
                                                  seq_len=48, seed=cfg.seed + 7), tok).tolist()
    before = acceptance_rate(teacher_loaded.source.folder, init, heldout) if heldout else None
    if before:
        log(f"acceptance before: {before['acceptance_rate']:.3f}")
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(start_step * cfg.grad_accum):  # a resumed run draws the batches it would have drawn
        torch.randint(0, len(samples), (cfg.batch_size,), generator=gen)
        if cfg.on_policy > 0:
            torch.rand((), generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    model.train()
    t0, tokens_seen = time.perf_counter(), 0
    step = start_step
    for step in range(start_step, cfg.steps):
        if cfg.max_minutes and time.perf_counter() - t0 > 60 * cfg.max_minutes:
            log(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        total = 0.0
        for micro in range(cfg.grad_accum):
            rows = torch.randint(0, len(samples), (cfg.batch_size,), generator=gen)
            ids = samples[rows]
            on_policy = cfg.on_policy > 0 and float(torch.rand((), generator=gen)) < cfg.on_policy
            if on_policy:  # continue half of each window with the student, score with the teacher
                model.eval()
                with torch.no_grad():
                    prefix = ids[:, : cfg.seq_len - cfg.on_policy_tokens]
                    ids = model.generate(prefix, attention_mask=torch.ones_like(prefix), do_sample=True,
                                         max_new_tokens=cfg.on_policy_tokens, min_new_tokens=cfg.on_policy_tokens,
                                         pad_token_id=tok.eos_token_id or 0)[:, : cfg.seq_len]
                model.train()
            with autocast:
                logits = model(input_ids=ids).logits[:, :-1]
            if on_policy or cached is None:
                with torch.no_grad():
                    t_logits = teacher_model(input_ids=ids).logits[:, :-1]
                if cfg.top_k:
                    top = t_logits.topk(cfg.top_k, dim=-1)
                    t_logits, t_index = top.values, top.indices
                else:
                    t_index = None
            else:
                t_logits = cached["values"][rows][:, :-1].float()
                t_index = cached["indices"][rows][:, :-1].long()
            loss = distill_loss(logits.reshape(-1, logits.shape[-1]), t_logits.reshape(-1, t_logits.shape[-1]),
                                cfg.loss, cfg.temperature, cfg.beta,
                                None if t_index is None else t_index.reshape(-1, t_index.shape[-1])) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
            tokens_seen += ids.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "loss": total})
        if progress:
            rate = tokens_seen / (time.perf_counter() - t0)
            progress(step + 1, cfg.steps, f"loss {total:.4f}, {rate:.0f} tok/s")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            ckpt = work / f"checkpoint-{step + 1}"
            ckpt.mkdir(exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad},
                      str(ckpt / "student.safetensors"))
            save_file(_optimizer_state(opt, params), str(ckpt / "optimizer.safetensors"))
            write_json(ckpt / "trainer.json", {"step": step + 1, "curve": curve, "fingerprint": fingerprint})
    else:
        step = cfg.steps
    model.eval()
    final = work / "student-final"
    model.save_pretrained(final)
    tok.save_pretrained(final)
    after = acceptance_rate(teacher_loaded.source.folder, final, heldout) if heldout else None
    report = {"teacher": str(teacher), "student": str(student) if student else f"{student_layers} teacher layers",
              "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "steps_done": step,
              "teacher_cache_seconds": cache_seconds, "seconds": time.perf_counter() - t0, "tokens": tokens_seen, "loss_curve": curve,
              "acceptance_before": before, "acceptance_after": after}
    write_json(final / "distill.json", report)
    move_into_place(final, out)
    shutil.rmtree(work, ignore_errors=True)  # checkpoints and the teacher cache: the run is complete
    return report
