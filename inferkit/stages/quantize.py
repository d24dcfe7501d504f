"""The quantize stage: choose each layer's format, quantize (RTN or sequential GPTQ), write
the compressed-tensors artifact."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from inferkit import __version__
from inferkit.artifacts import check_output_dir
from inferkit.config import QuantizeConfig, Recipe
from inferkit.data.calibration import build_samples
from inferkit.errors import InferkitError
from inferkit.models import load_model
from inferkit.quant.gptq import GPTQConfig, gptq_quantize
from inferkit.quant.rtn import QuantizedWeight, quantize_weight_rtn
from inferkit.quant.scheme import QuantFormat
from inferkit.stages import layerwise
from inferkit.stages.artifact import write_quantized_artifact
from inferkit.stages.stats import load_layer_stats
from inferkit.stages.timer import PhaseTimer

Progress = Callable[[int, int, str], None]


@dataclass
class QuantizeResult:
    out: Path
    layer_formats: dict[str, QuantFormat | None]
    bits_per_weight: float
    seconds: dict[str, float]
    peak_rss_mb: float
    gptq_loss: dict[str, float] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


def plan_formats(model: nn.Module, cfg: QuantizeConfig) -> dict[str, QuantFormat | None]:
    """Format of every linear layer (None = full precision); checks that groups tile."""
    plan = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            fmt = cfg.format_for(name)
            if fmt is not None:
                fmt.check_divides(name, mod.in_features)
            plan[name] = fmt
    return plan


def bits_per_weight(qweights: dict[str, QuantizedWeight], scale_bits: int) -> float:
    """Average stored bits per quantized weight, scales and zero points included."""
    bits = sum(qw.fmt.storage_bits(*qw.q.shape, scale_bits) for qw in qweights.values())
    numel = sum(qw.q.numel() for qw in qweights.values())
    return bits / numel if numel else 0.0


def _gptq_config(cfg: QuantizeConfig) -> GPTQConfig:
    return GPTQConfig(cfg.damp, cfg.block_size, cfg.actorder, cfg.scale_search)


def _set_weight(mod: nn.Linear, qw: QuantizedWeight) -> None:
    """Replace a linear's weight by its dequantized value, so later layers see the error.

    A new tensor rather than an in-place copy: the loaded weights are memory-mapped from the
    checkpoint, and writing into them would turn every page into a private copy that stays
    resident for the whole run.
    """
    mod.weight.data = qw.dequantize().to(mod.weight.dtype)


def quantize_rtn(model, plan, cfg, timer, progress: Progress | None) -> dict[str, QuantizedWeight]:
    modules = dict(model.named_modules())
    todo = [n for n, f in plan.items() if f is not None]
    out = {}
    with timer.phase("solve"):
        for i, name in enumerate(todo):
            out[name] = quantize_weight_rtn(modules[name].weight.data, plan[name], cfg.scale_search)
            if progress:
                progress(i + 1, len(todo), name)
    return out


def _solve_layer(linears, plan, stats_by_owner, shared, cfg, timer, losses) -> dict[str, QuantizedWeight]:
    out = {}
    with timer.phase("solve"):
        for name, mod in linears.items():
            fmt = plan.get(name)
            if fmt is None:
                continue
            h = stats_by_owner[shared.get(name, name)]
            qw, loss = gptq_quantize(mod.weight.data, h, fmt, _gptq_config(cfg))
            losses[name] = loss
            _set_weight(mod, qw)
            out[name] = qw
    return out


def quantize_gptq_sequential(model, samples, plan, cfg, timer, progress, losses) -> dict[str, QuantizedWeight]:
    """Layer by layer: gather Hessians on inputs that already carry the earlier layers'
    quantization error, solve, then rerun the quantized layer to feed the next one."""
    with timer.phase("forward"):
        inputs = layerwise.capture_first_inputs(model, samples, cfg.batch_size)
    layers = layerwise.decoder_layers(model)
    out = {}
    for idx, layer in enumerate(layers):
        linears = layerwise.linear_modules(layer, f"model.layers.{idx}")
        stats, shared = layerwise.gather_input_stats(layer, inputs, linears, advance_inputs=False, timer=timer)
        hessians = {k: v.xtx for k, v in stats.items()}
        out.update(_solve_layer(linears, plan, hessians, shared, cfg, timer, losses))
        del stats, hessians
        with timer.phase("propagate"):
            layerwise.advance(layer, inputs)
        _release_weights(linears, out)
        if progress:
            progress(idx + 1, len(layers), f"layer {idx}")
    return out


def _release_weights(linears: dict[str, nn.Linear], done: dict[str, QuantizedWeight]) -> None:
    """Drop the float weights of finished layers (only their packed form is written), so
    memory shrinks as the run proceeds instead of holding packed and float copies to the end."""
    for name, mod in linears.items():
        if name in done:
            mod.weight.data = torch.empty(0, dtype=mod.weight.dtype)


def quantize_gptq_from_stats(model, stats_dir: Path, plan, cfg, timer, progress, losses) -> dict[str, QuantizedWeight]:
    """GPTQ from Hessians saved by ``inferkit calibrate`` (gathered on the unquantized model)."""
    layers = layerwise.decoder_layers(model)
    out = {}
    for idx, layer in enumerate(layers):
        linears = layerwise.linear_modules(layer, f"model.layers.{idx}")
        with timer.phase("load_stats"):
            hessians, shared = load_layer_stats(stats_dir, idx, linears)
        out.update(_solve_layer(linears, plan, hessians, shared, cfg, timer, losses))
        if progress:
            progress(idx + 1, len(layers), f"layer {idx}")
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB. Linux's VmHWM belongs to the address
    space, so unlike ``ru_maxrss`` it does not inherit a parent's peak across fork/exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_quantize(model_path: str, recipe: Recipe, out: str | Path, overwrite: bool = False,
                 stats_dir: str | Path | None = None, progress: Progress | None = None) -> QuantizeResult:
    """Quantize ``model_path`` per ``recipe`` and write the artifact folder ``out``."""
    out = Path(out)
    check_output_dir(out, overwrite)
    cfg = recipe.quantize
    timer = PhaseTimer()
    start = time.perf_counter()
    with timer.phase("load"):
        loaded = load_model(model_path)
    model = loaded.model
    plan = plan_formats(model, cfg)
    if not any(plan.values()):
        raise InferkitError("no linear layer is left to quantize: check the ignore list and overrides")
    losses: dict[str, float] = {}
    with torch.no_grad():
        if cfg.method == "rtn":
            qweights = quantize_rtn(model, plan, cfg, timer, progress)
        elif stats_dir is not None:
            qweights = quantize_gptq_from_stats(model, Path(stats_dir), plan, cfg, timer, progress, losses)
        else:
            with timer.phase("calibration_data"):
                samples = build_samples(recipe.calibration, loaded.tokenizer)
            qweights = quantize_gptq_sequential(model, samples, plan, cfg, timer, progress, losses)
    scale_bits = torch.finfo(model.dtype).bits
    bpw = bits_per_weight(qweights, scale_bits)
    with timer.phase("write"):
        manifest = write_quantized_artifact(
            loaded, qweights, plan, recipe, out, overwrite,
            extra={
                "inferkit_version": __version__,
                "stage": "quantize",
                "method": cfg.method,
                "calibration_stats": str(stats_dir) if stats_dir else None,
                "bits_per_weight": round(bpw, 4),
                "gptq_loss": {k: round(v, 6) for k, v in losses.items()},
            },
        )
    seconds = timer.as_dict()
    seconds["total"] = round(time.perf_counter() - start, 3)
    return QuantizeResult(out, plan, bpw, seconds, peak_rss_mb(), losses, manifest)
