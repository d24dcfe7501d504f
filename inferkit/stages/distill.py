"""Draft models for speculative decoding: a student cut from the teacher (``--student-layers N``)
or given, trained on the teacher's next-token distributions (forward/reverse KL, generalised JSD,
TV distance), optionally with a reduced output vocabulary, on text, the teacher's own
continuations, or the student's own samples scored by the teacher (on-policy)."""

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
                 teacher_index=None, mask=None):
    """Mean per-token divergence between teacher and student next-token distributions.

    ``fkl``: KL(teacher ‖ student); ``rkl``: KL(student ‖ teacher); ``jsd``: generalised
    Jensen-Shannon with mixture m = β·teacher + (1-β)·student, β·KL(t‖m) + (1-β)·KL(s‖m);
    ``tvd``: total variation ½·Σ|t - s|. With ``teacher_index`` [N, k] the teacher logits are its
    top k (``teacher_logits`` [N, k]) and both distributions are taken over those k tokens.
    ``mask`` [N, k] (with ``teacher_index``): entries to leave out, e.g. teacher tokens outside a
    reduced draft vocabulary; rows with nothing left count for nothing.
    """
    import torch
    import torch.nn.functional as F

    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if teacher_index is not None:
        s = s.gather(-1, teacher_index)
    if mask is not None:  # a large finite fill: the left-out entries get probability 0, no NaN
        s, t = s.masked_fill(~mask, -1e9), t.masked_fill(~mask, -1e9)
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
    if mask is not None:
        keep = mask.any(-1)
        return (per * keep).sum() / keep.sum().clamp(min=1)
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
    draft_vocab: int = 0  # 0: the full vocabulary; N: a head over the N most frequent target tokens
    teacher_data: float = 0.0  # fraction of windows whose last tokens the teacher writes itself
    teacher_data_tokens: int = 64
    teacher_data_temperature: float = 0.0  # 0: the teacher's greedy continuation

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
        if not 0 <= self.teacher_data <= 1:
            raise InferkitError(f"teacher_data must be in [0, 1], got {self.teacher_data}")
        for name, used in (("on_policy_tokens", self.on_policy), ("teacher_data_tokens", self.teacher_data)):
            if used and not 1 <= getattr(self, name) < self.seq_len:
                raise InferkitError(f"{name} must be between 1 and seq_len - 1 ({self.seq_len - 1}), got {getattr(self, name)}")
        if self.draft_vocab == 1 or self.draft_vocab < 0:
            raise InferkitError(f"draft_vocab must be 0 (the full vocabulary) or at least 2, got {self.draft_vocab}")
        if self.teacher_data_temperature < 0:
            raise InferkitError(f"teacher_data_temperature must be >= 0, got {self.teacher_data_temperature}")
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


def select_draft_vocab(counts, size: int, always: list[int] = ()):
    """The ``size`` most frequent token ids (ties: the lower id) including ``always``, ascending."""
    import torch

    if not 2 <= size <= len(counts):
        raise InferkitError(f"--draft-vocab must be between 2 and the vocabulary size {len(counts)}, got {size}")
    counts = counts.clone().double()
    counts[list(always)] = float("inf")
    order = torch.sort(-counts, stable=True).indices
    return order[:size].sort().values


def make_student(model, d2t):
    """The module being trained: the HF model and, for a reduced draft vocabulary, its own
    output head over the kept tokens (initialised from the full head's rows)."""
    import inspect

    import torch

    CACHE_ARG = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    class Student(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.head = None
            if d2t is not None:
                rows = model.get_output_embeddings().weight.detach()[d2t].clone()
                self.head = torch.nn.Linear(rows.shape[1], rows.shape[0], bias=False)
                self.head.weight.data.copy_(rows)

        def forward(self, input_ids, past_key_values=None, use_cache=False):
            # transformers renamed past_key_values to cache (5.2x): pass whichever it takes.
            if self.head is None:
                out = self.model(input_ids=input_ids, use_cache=use_cache, **{CACHE_ARG: past_key_values})
                return out.logits, getattr(out, CACHE_ARG)
            out = self.model.model(input_ids=input_ids, use_cache=use_cache, **{CACHE_ARG: past_key_values})
            return self.head(out.last_hidden_state), getattr(out, CACHE_ARG)

    return Student()


def sample_continuation(student, d2t, prefix, num_tokens: int, generator):
    """``prefix`` [B, P] continued by ``num_tokens`` tokens sampled from the student (its own head:
    draft ids are mapped back to target ids), using its KV cache: [B, P + num_tokens]."""
    import torch

    ids = prefix
    with torch.no_grad():
        logits, past = student(prefix, use_cache=True)
        for i in range(num_tokens):
            probs = torch.softmax(logits[:, -1].float(), -1)
            token = torch.multinomial(probs, 1, generator=generator)
            if d2t is not None:
                token = d2t[token]
            ids = torch.cat([ids, token], dim=1)
            if i + 1 < num_tokens:
                logits, past = student(token, past_key_values=past, use_cache=True)
    return ids


def teacher_continuations(folder: Path, prefixes, num_tokens: int, temperature: float, seed: int, progress=None):
    """The teacher's own continuations of ``prefixes`` [N, P] (the bundled runtime, batched): [N, num_tokens]."""
    import torch

    from inferkit.runtime import LLM, SamplingParams

    llm = LLM(folder, kv_cache_gb=0.5, max_model_len=prefixes.shape[1] + num_tokens)
    rows, batch = [], 64
    for start in range(0, len(prefixes), batch):
        part = prefixes[start: start + batch].tolist()
        params = [SamplingParams(temperature=temperature, max_tokens=num_tokens, ignore_eos=True, seed=seed + start + i)
                  for i in range(len(part))]
        rows += [o.token_ids for o in llm.generate(part, params)]
        if progress:
            progress(min(start + batch, len(prefixes)), len(prefixes), "teacher continuations")
    return torch.tensor(rows, dtype=torch.long)


def _cache_key(teacher: str, cfg: DistillConfig) -> str:
    import hashlib

    fields = ("calibration", "num_samples", "seq_len", "seed", "teacher_data", "teacher_data_tokens",
              "teacher_data_temperature")
    blob = json.dumps([str(teacher)] + [getattr(cfg, f) for f in fields])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _process_group_closer():
    """What closes an ``accelerate launch`` run's process group on this process, if this run
    opens it (a group the caller opened is left alone). Each process calls it after its last
    collective, and when it fails: one that left the interpreter with the group still open could
    abort on exit ("terminate called without an active exception") and fail the whole launch
    after the work was done."""
    import torch.distributed as dist

    def close() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    opened_before = dist.is_available() and dist.is_initialized()
    return (lambda: None) if opened_before else close


def run_distill(teacher: str, out: Path, cfg: DistillConfig, student: str | None = None,
                student_layers: int | None = None, resume: Path | None = None, overwrite: bool = False,
                eval_prompts: int = 0, eval_data: str = "builtin", cache_dir: Path | None = None,
                log=lambda msg: None, progress=None) -> dict:
    """Train a draft on the teacher's next-token distributions; write an HF folder + distill.json.

    ``eval_prompts``: held-out prompts (48 tokens from ``eval_data``: the built-in held-out split,
    or a text file) on which the greedy acceptance at k=4 is measured before and after.
    ``cache_dir``: keep the training windows and the teacher's top-k logits there (named by a hash
    of the teacher and the data settings) so runs with other losses or schedules reuse them;
    by default they live in the run's work folder and are deleted with it.

    Runs as one process, or as several under ``accelerate launch`` (data parallel: each process
    takes its share of every batch, gradients are averaged; the first process computes the
    teacher caches, writes checkpoints and the output).
    """
    close_group = _process_group_closer()
    try:
        return _distill(teacher, out, cfg, student, student_layers, resume, overwrite, eval_prompts, eval_data,
                        cache_dir, log, progress, close_group)
    finally:
        close_group()


def _distill(teacher, out, cfg, student, student_layers, resume, overwrite, eval_prompts, eval_data, cache_dir, log,
             progress, close_group) -> dict:
    import shutil
    import time

    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from inferkit.artifacts import check_output_dir, move_into_place, write_json
    from inferkit.data.calibration import CalibrationConfig, build_samples
    from inferkit.models import load_model
    from inferkit.runtime.speculative import DRAFT_VOCAB_FILE

    if (student is None) == (student_layers is None):
        raise InferkitError("pass exactly one of --student FOLDER or --student-layers N")
    acc = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    if cfg.batch_size % world:
        raise InferkitError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    if not main:  # the other processes stay quiet
        log, progress = (lambda msg: None), None
    check_output_dir(out, overwrite or resume is not None)
    work = out.parent / f".{out.name}.partial"
    if main:
        work.mkdir(parents=True, exist_ok=True)
    teacher_loaded = load_model(teacher)
    tok = teacher_loaded.tokenizer
    teacher_model = teacher_loaded.model.to(acc.device)
    vocab = teacher_model.config.vocab_size
    init = work / "student-init"
    if main and not init.exists():
        if student_layers is not None:
            build_student(teacher, student_layers, init)
        else:
            shutil.copytree(Path(student).expanduser(), init)
    acc.wait_for_everyone()
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    if model.config.vocab_size != vocab:
        raise InferkitError(f"the student's vocabulary has {model.config.vocab_size} tokens, the teacher's "
                            f"{vocab}: the draft must share the teacher's tokenizer")
    if cfg.draft_vocab > vocab:
        raise InferkitError(f"--draft-vocab {cfg.draft_vocab} is larger than the teacher's vocabulary ({vocab})")
    fingerprint = {"teacher": str(teacher), "student": str(student), "student_layers": student_layers,
                   "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in ("steps", "max_minutes", "checkpoint_every")}}
    torch.manual_seed(cfg.seed)
    key = _cache_key(teacher, cfg)
    t_cache = time.perf_counter()
    # 1. Training windows; with --teacher-data a fraction of them end in the teacher's own text.
    store = Path(cache_dir) if cache_dir is not None else work
    if main:
        store.mkdir(parents=True, exist_ok=True)
    data_file = store / f"windows-{key}.safetensors"
    if main and not data_file.is_file():
        samples = build_samples(CalibrationConfig(source=cfg.calibration, num_samples=cfg.num_samples,
                                                  seq_len=cfg.seq_len, seed=cfg.seed), tok)
        if cfg.teacher_data > 0:
            count = round(cfg.teacher_data * len(samples))
            rows = torch.randperm(len(samples), generator=torch.Generator().manual_seed(cfg.seed + 3))[:count]
            cut = cfg.seq_len - cfg.teacher_data_tokens
            samples[rows, cut:] = teacher_continuations(teacher_loaded.source.folder, samples[rows, :cut],
                                                        cfg.teacher_data_tokens, cfg.teacher_data_temperature,
                                                        cfg.seed, progress)
        save_file({"ids": samples.contiguous()}, str(data_file.with_suffix(".tmp")))
        data_file.with_suffix(".tmp").replace(data_file)  # a shared cache never holds half a file
    acc.wait_for_everyone()
    samples = load_file(str(data_file))["ids"]
    # 2. Teacher top-k logits, computed once for every window: epochs then skip the teacher.
    cache = store / f"teacher-top{cfg.top_k}-{key}.safetensors"
    if cfg.top_k and main and not cache.is_file():
        vals, idx = [], []
        with torch.no_grad():
            for i, batch in enumerate(samples.split(cfg.batch_size)):
                top = teacher_model(input_ids=batch.to(acc.device)).logits.topk(cfg.top_k, dim=-1)
                vals.append(top.values.to(torch.bfloat16).cpu())
                idx.append(top.indices.to(torch.int32).cpu())
                if progress:
                    progress(i + 1, -(-len(samples) // cfg.batch_size), "teacher logits")
        save_file({"values": torch.cat(vals), "indices": torch.cat(idx)}, str(cache.with_suffix(".tmp")))
        cache.with_suffix(".tmp").replace(cache)
    acc.wait_for_everyone()
    cached = load_file(str(cache)) if cfg.top_k else None
    cache_seconds = time.perf_counter() - t_cache
    # 3. A reduced draft vocabulary: the tokens the draft must most often predict.
    d2t = t2d = None
    vocab_report = None
    if cfg.draft_vocab:
        counts = torch.bincount(samples.flatten(), minlength=vocab)
        if cached is not None:  # the teacher's own top choices weigh as much as the text
            counts += torch.bincount(cached["indices"][..., 0].flatten().long(), minlength=vocab)
        always = [t for t in (tok.eos_token_id, tok.bos_token_id) if t is not None]
        d2t = select_draft_vocab(counts, cfg.draft_vocab, always)
        t2d = torch.full((vocab,), -1, dtype=torch.long)
        t2d[d2t] = torch.arange(len(d2t))
        vocab_report = {"size": len(d2t), "coverage": float(counts[d2t].sum() / counts.sum())}
        log(f"draft vocabulary: {len(d2t)} tokens cover {vocab_report['coverage']:.1%} of the training targets")
        if main and not (init / DRAFT_VOCAB_FILE).is_file():
            save_file({"d2t": d2t}, str(init / DRAFT_VOCAB_FILE))
    heldout = None
    if eval_prompts and main:
        heldout = build_samples(CalibrationConfig(source=eval_data, split="heldout" if eval_data == "builtin" else "train",
                                                  num_samples=eval_prompts, seq_len=48, seed=cfg.seed + 7), tok).tolist()
    before = acceptance_rate(teacher_loaded.source.folder, init, heldout) if heldout else None
    if before:
        log(f"acceptance before: {before['acceptance_rate']:.3f}")
    if not cfg.train_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        if model.get_output_embeddings() is not None:
            model.get_output_embeddings().weight.requires_grad_(False)
    student_module = make_student(model, d2t)  # a reduced head is always trained
    params = [p for p in student_module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sample_gen = torch.Generator(device=acc.device).manual_seed(cfg.seed + 2 + rank)  # where the student samples
    start_step, curve = 0, []
    if resume is not None:
        state_file = Path(resume) / "trainer.json"
        if not state_file.is_file():
            raise InferkitError(f"{resume} is not a distill checkpoint (no trainer.json)")
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") != json.loads(json.dumps(fingerprint)):
            raise InferkitError(f"checkpoint {resume} is from a different run (other teacher, student or settings)")
        if state.get("processes", 1) != world:
            raise InferkitError(f"checkpoint {resume} was written by {state.get('processes', 1)} processes, this run has {world}")
        student_module.load_state_dict(load_file(str(Path(resume) / "student.safetensors")), strict=False)
        _load_optimizer_state(opt, params, load_file(str(Path(resume) / "optimizer.safetensors")))
        rng = Path(resume) / f"rng-{rank}.safetensors"
        if rng.is_file():
            sample_gen.set_state(load_file(str(rng))["state"])
        start_step, curve = state["step"], state["curve"]
        log(f"resuming from step {start_step}")
    trained = acc.prepare_model(student_module) if world > 1 else student_module.to(acc.device)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    for _ in range(start_step * cfg.grad_accum):  # a resumed run draws the batches it would have drawn
        torch.randint(0, len(samples), (cfg.batch_size,), generator=gen)
        if cfg.on_policy > 0:
            torch.rand((), generator=gen)
    device = acc.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    d2t_dev = None if d2t is None else d2t.to(device)
    t2d_dev = None if t2d is None else t2d.to(device)
    trained.train()
    t0, tokens_seen = time.perf_counter(), 0
    step = start_step
    for step in range(start_step, cfg.steps):
        stop = torch.tensor(float(bool(cfg.max_minutes) and time.perf_counter() - t0 > 60 * cfg.max_minutes))
        if world > 1:  # every process stops at the same step
            stop = acc.reduce(stop, "sum")
        if float(stop):
            log(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        total = 0.0
        for micro in range(cfg.grad_accum):
            rows = torch.randint(0, len(samples), (cfg.batch_size,), generator=gen)[rank::world]
            ids = samples[rows].to(device)
            on_policy = cfg.on_policy > 0 and float(torch.rand((), generator=gen)) < cfg.on_policy
            if on_policy:  # continue each window's start with the student, score with the teacher
                student_module.eval()
                prefix = ids[:, : cfg.seq_len - cfg.on_policy_tokens]
                ids = sample_continuation(student_module, d2t_dev, prefix, cfg.on_policy_tokens, sample_gen)
                student_module.train()
            with autocast:
                logits, _ = trained(ids)
            logits = logits[:, :-1]
            mask = None
            if on_policy or cached is None:
                with torch.no_grad():
                    t_logits = teacher_model(input_ids=ids).logits[:, :-1]
                if cfg.top_k:
                    top = t_logits.topk(cfg.top_k, dim=-1)
                    t_logits, t_index = top.values, top.indices
                elif d2t_dev is not None:
                    t_logits, t_index = t_logits[..., d2t_dev], None
                else:
                    t_index = None
            else:
                t_logits = cached["values"][rows][:, :-1].float().to(device)
                t_index = cached["indices"][rows][:, :-1].long().to(device)
            if t_index is not None and t2d_dev is not None:  # teacher ids -> draft ids, others left out
                t_index = t2d_dev[t_index]
                mask = t_index >= 0
                t_index = t_index.clamp(min=0)
            flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])  # noqa: E731
            loss = distill_loss(flat(logits), flat(t_logits), cfg.loss, cfg.temperature, cfg.beta,
                                flat(t_index), flat(mask)) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
            tokens_seen += ids.numel() * world
        if world > 1:
            total = float(acc.reduce(torch.tensor(total, device=device), "mean"))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "loss": total})
        if progress:
            rate = tokens_seen / (time.perf_counter() - t0)
            progress(step + 1, cfg.steps, f"loss {total:.4f}, {rate:.0f} tok/s")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            ckpt = work / f"checkpoint-{step + 1}"
            if main:
                ckpt.mkdir(exist_ok=True)
                save_file({k: v.detach().contiguous().cpu() for k, v in student_module.named_parameters() if v.requires_grad},
                          str(ckpt / "student.safetensors"))
                save_file(_optimizer_state(opt, params), str(ckpt / "optimizer.safetensors"))
            acc.wait_for_everyone()
            save_file({"state": sample_gen.get_state()}, str(ckpt / f"rng-{rank}.safetensors"))
            acc.wait_for_everyone()
            if main:  # written last: a checkpoint with trainer.json is complete
                write_json(ckpt / "trainer.json", {"step": step + 1, "curve": curve, "fingerprint": fingerprint,
                                                   "processes": world})
    else:
        step = cfg.steps
    acc.wait_for_everyone()
    close_group()  # after the last collective: the other processes may exit while the first writes the output
    if not main:
        return {}
    student_module.eval()
    final = work / "student-final"
    export_student(student_module, d2t, final)
    tok.save_pretrained(final)
    after = acceptance_rate(teacher_loaded.source.folder, final, heldout) if heldout else None
    report = {"teacher": str(teacher), "student": str(student) if student else f"{student_layers} teacher layers",
              "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "processes": world, "steps_done": step,
              "draft_vocab": vocab_report, "teacher_cache_seconds": cache_seconds,
              "seconds": time.perf_counter() - t0, "tokens": tokens_seen, "loss_curve": curve,
              "acceptance_before": before, "acceptance_after": after}
    write_json(final / "distill.json", report)
    move_into_place(final, out)
    shutil.rmtree(work, ignore_errors=True)  # checkpoints and the teacher cache: the run is complete
    return report


def export_student(student_module, d2t, folder: Path) -> None:
    """Save the trained draft as a plain HF folder. A reduced head's rows are written into a full,
    untied output head (a plain load still works; rows outside the draft vocabulary keep the
    embeddings' values) and ``draft_vocab.safetensors`` tells the runtime which rows to keep."""
    import torch
    from safetensors.torch import save_file

    from inferkit.runtime.speculative import DRAFT_VOCAB_FILE

    model = student_module.model
    if d2t is not None:
        full = model.get_output_embeddings().weight.detach().clone()
        full[d2t] = student_module.head.weight.detach().to(full.dtype)
        head = torch.nn.Linear(full.shape[1], full.shape[0], bias=False)
        head.weight = torch.nn.Parameter(full)
        model.lm_head = head
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    model.save_pretrained(folder)
    if d2t is not None:
        save_file({"d2t": d2t.cpu().contiguous()}, str(folder / DRAFT_VOCAB_FILE))
