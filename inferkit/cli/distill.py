"""inferkit distill --teacher T (--student S | --student-layers N) -o OUT"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inferkit.cli import options as o
from inferkit.cli.ui import console, handle_errors, progress_bar, table


@handle_errors
def distill(
    teacher: Annotated[str, typer.Option(help="The served model (a folder, .gguf, or 'demo').")],
    out: o.OutOpt,
    student: Annotated[Optional[Path], typer.Option(help="A student model folder with the teacher's tokenizer.")] = None,
    student_layers: Annotated[Optional[int], typer.Option(help="Build the student from N teacher layers (evenly spaced, with the last).")] = None,
    loss: Annotated[str, typer.Option(help="fkl (forward KL), rkl (reverse KL), jsd (generalised JSD) or tvd.")] = "fkl",
    beta: Annotated[float, typer.Option(help="JSD mixture weight of the teacher.")] = 0.5,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of both distributions.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Teacher logits kept per token (cached once); 0: the full vocabulary, live.")] = 64,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Windows per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine).")] = 3e-4,
    warmup: Annotated[int, typer.Option(help="Warm-up steps.")] = 20,
    seq_len: Annotated[int, typer.Option(help="Tokens per training window.")] = 128,
    num_samples: Annotated[int, typer.Option(help="Training windows drawn from the data.")] = 512,
    calibration: Annotated[str, typer.Option(help="Training text: a calibration source or a .txt/.jsonl file.")] = "builtin",
    on_policy: Annotated[float, typer.Option(help="Fraction of steps on the student's own continuations, scored by the teacher.")] = 0.0,
    train_embeddings: Annotated[bool, typer.Option("--train-embeddings/--freeze-embeddings", help="Train the embeddings and head too.")] = False,
    dtype: Annotated[str, typer.Option(help="float32 or bfloat16 (autocast).")] = "float32",
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps (0: never).")] = 0,
    resume: Annotated[Optional[Path], typer.Option(help="Continue from a checkpoint folder of the same run.")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop training after this many minutes.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for data and initialisation.")] = 0,
    draft_vocab: Annotated[int, typer.Option(help="Give the draft a head over the N most frequent target tokens (0: the full vocabulary); the id map is stored beside the draft.")] = 0,
    teacher_data: Annotated[float, typer.Option(help="Fraction of training windows whose last tokens the teacher writes (its own continuations).")] = 0.0,
    teacher_data_tokens: Annotated[int, typer.Option(help="Tokens the teacher writes per such window.")] = 64,
    teacher_data_temperature: Annotated[float, typer.Option(help="Sampling temperature of the teacher's continuations (0: greedy).")] = 0.0,
    eval_prompts: Annotated[int, typer.Option(help="Held-out prompts for the acceptance before and after (0: skip).")] = 8,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Keep training windows and teacher logits here, reused by later runs with the same teacher and data.")] = None,
    eval_data: Annotated[str, typer.Option(help="Where held-out prompts come from: 'builtin' (its held-out split) or a text file not used in training.")] = "builtin",
    overwrite: o.OverwriteOpt = False,
) -> None:
    """Train a small draft model on the teacher's next-token distributions, for speculative decoding.

    Several processes: `accelerate launch --num_processes N -m inferkit distill ...`."""
    from inferkit.models.demo import resolve_model_arg
    from inferkit.stages.distill import DistillConfig, run_distill

    cfg = DistillConfig(loss=loss, beta=beta, temperature=temperature, top_k=top_k or None, steps=steps,
                        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup, seq_len=seq_len,
                        num_samples=num_samples, calibration=calibration, seed=seed, on_policy=on_policy,
                        train_embeddings=train_embeddings, dtype=dtype, checkpoint_every=checkpoint_every,
                        max_minutes=max_minutes, draft_vocab=draft_vocab, teacher_data=teacher_data,
                        teacher_data_tokens=teacher_data_tokens, teacher_data_temperature=teacher_data_temperature)
    teacher_path = resolve_model_arg(teacher, log=console.print)
    with progress_bar("distilling") as update:
        report = run_distill(teacher_path, out, cfg, str(student) if student else None, student_layers, resume,
                             overwrite, eval_prompts, eval_data, cache_dir, log=console.print, progress=update)
    if not report:  # another process of an `accelerate launch` run: the first one reports
        return
    rows = [["steps", report["steps_done"]], ["seconds", report["seconds"]], ["tokens", report["tokens"]],
            ["final loss", report["loss_curve"][-1]["loss"] if report["loss_curve"] else None]]
    for name in ("before", "after"):
        acc = report[f"acceptance_{name}"]
        if acc:
            rows.append([f"acceptance {name} (k=4, greedy)", acc["acceptance_rate"]])
    console.print(table(f"distill → {out}", ["metric", "value"], rows))
