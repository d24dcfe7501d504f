"""The quantize stage: choose each layer's format, quantize (RTN or sequential GPTQ), write
the compressed-tensors artifact."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from inferkit import __version__
from inferkit.artifacts import check_output_dir, write_json
from inferkit.config import QuantizeConfig, Recipe
from inferkit.data.calibration import build_samples
from inferkit.errors import InferkitError
from inferkit.models import LoadedModel, load_model
from inferkit.models.lazy import LazyWeights
from inferkit.quant.compressed import PackedWeight
from inferkit.quant.hessian import InputStats
from inferkit.quant.gptq import GPTQConfig, gptq_quantize
from inferkit.quant.rtn import QuantizedWeight, quantize_weight_rtn
from inferkit.quant.scheme import QuantFormat
from inferkit.stages import layerwise
from inferkit.stages.artifact import write_quantized_artifact
from inferkit.stages.memory import peak_rss_mb, trim_heap
from inferkit.stages.plan import load_scan, make_plan, plan_layer_formats
from inferkit.stages.sensitivity import HEATMAP, SCAN_FILE, model_fingerprint, run_scan
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


def bits_per_weight(packed: dict[str, PackedWeight], scale_bits: int) -> float:
    """Average stored bits per quantized weight, scales and zero points included."""
    bits = sum(pw.storage_bits(scale_bits) for pw in packed.values())
    numel = sum(pw.shape[0] * pw.shape[1] for pw in packed.values())
    return bits / numel if numel else 0.0


def _gptq_config(cfg: QuantizeConfig, scale_dtype: torch.dtype) -> GPTQConfig:
    return GPTQConfig(cfg.damp, cfg.block_size, cfg.actorder, cfg.scale_search, scale_dtype)


def _set_weight(mod: nn.Linear, qw: QuantizedWeight) -> None:
    """Replace a linear's weight by its dequantized value, so later layers see the error.

    A new tensor rather than an in-place copy: the loaded weights are memory-mapped from the
    checkpoint, and writing into them would turn every page into a private copy that stays
    resident for the whole run. A new parameter, too: a head tied to the embeddings must not
    change them.
    """
    mod.weight = nn.Parameter(qw.dequantize().to(mod.weight.dtype), requires_grad=False)


def quantize_rtn(loaded: LoadedModel, plan, cfg, timer, progress: Progress | None) -> dict[str, PackedWeight]:
    modules = dict(loaded.model.named_modules())
    todo = [n for n, f in plan.items() if f is not None]
    out = {}
    with timer.phase("solve"):
        for i, name in enumerate(todo):
            one = {name: modules[name]}
            loaded.load_weights(one)
            weight = modules[name].weight.data
            scale_dtype = cfg.scale_torch_dtype(weight.dtype)
            qw = quantize_weight_rtn(weight, plan[name], cfg.scale_search, scale_dtype=scale_dtype)
            out[name] = PackedWeight.of(qw, scale_dtype)
            _release_weights(one, out)
            if progress:
                progress(i + 1, len(todo), name)
    return out


def _solve_layer(linears, plan, stats_by_owner, shared, cfg, timer, losses) -> dict[str, PackedWeight]:
    """GPTQ every quantized linear of one layer; each weight is replaced by its dequantized
    value (later layers see the error) and kept only in packed form."""
    out = {}
    with timer.phase("solve"):
        for name, mod in linears.items():
            fmt = plan.get(name)
            if fmt is None:
                continue
            h = stats_by_owner[shared.get(name, name)]
            scale_dtype = cfg.scale_torch_dtype(mod.weight.dtype)
            qw, loss = gptq_quantize(mod.weight.data, h, fmt, _gptq_config(cfg, scale_dtype))
            losses[name] = loss
            _set_weight(mod, qw)
            out[name] = PackedWeight.of(qw, scale_dtype)
    return out


def quantize_gptq_sequential(loaded: LoadedModel, samples, plan, cfg, timer, progress, losses) -> dict[str, PackedWeight]:
    """Layer by layer: gather Hessians on inputs that already carry the earlier layers'
    quantization error, solve, then rerun the quantized layer to feed the next one."""
    model = loaded.model
    with timer.phase("forward"):
        inputs = layerwise.capture_first_inputs(model, samples, cfg.batch_size)
    loaded.offload_embeddings()
    trim_heap()
    layers = layerwise.decoder_layers(model)
    out = {}
    for idx, layer in enumerate(layers):
        linears = layerwise.linear_modules(layer, f"model.layers.{idx}")
        with timer.phase("load"):
            loaded.load_weights(linears)
        stats, shared = layerwise.gather_input_stats(layer, inputs, linears, advance_inputs=False, timer=timer)
        hessians = {k: v.xtx for k, v in stats.items()}
        out.update(_solve_layer(linears, plan, hessians, shared, cfg, timer, losses))
        del stats, hessians
        with timer.phase("propagate"):
            layerwise.advance(layer, inputs)
        _release_weights(linears, out)
        trim_heap()
        if progress:
            progress(idx + 1, len(layers), f"layer {idx}")
    head = _head_linears(model, plan)
    if head:
        # The head reads the final norm of the last layer's outputs.
        loaded.restore_embeddings()  # a tied head shares the embedding matrix
        with timer.phase("hessian"):
            final = InputStats(model.config.hidden_size)
            for hidden in inputs.hidden:
                final.add(model.model.norm(hidden))
        out.update(_solve_layer(head, plan, {name: final.xtx for name in head}, {}, cfg, timer, losses))
    return out


def _head_linears(model: nn.Module, plan: dict[str, QuantFormat | None]) -> dict[str, nn.Linear]:
    """Quantized linears outside the decoder layers: only the output head is supported."""
    modules = dict(model.named_modules())
    rest = {n: modules[n] for n, f in plan.items() if f is not None and not n.startswith("model.layers.")}
    head = model.get_output_embeddings()
    for name, mod in rest.items():
        if mod is not head:
            raise InferkitError(f"{name} is outside the decoder layers and is not the output head; add it to ignore")
    return rest


def _release_weights(linears: dict[str, nn.Linear], done: dict[str, PackedWeight]) -> None:
    """Drop the float weights of finished linears (only their packed form is written), so
    memory holds one layer's weights at a time instead of the whole model's."""
    LazyWeights.release({name: mod for name, mod in linears.items() if name in done})


def quantize_gptq_from_stats(loaded: LoadedModel, stats_dir: Path, plan, cfg, timer, progress, losses) -> dict[str, PackedWeight]:
    """GPTQ from Hessians saved by ``inferkit calibrate`` (gathered on the unquantized model)."""
    layers = layerwise.decoder_layers(loaded.model)
    out = {}
    for idx, layer in enumerate(layers):
        linears = layerwise.linear_modules(layer, f"model.layers.{idx}")
        with timer.phase("load_stats"):
            hessians, shared = load_layer_stats(stats_dir, idx, linears)
        with timer.phase("load"):
            loaded.load_weights(linears)
        out.update(_solve_layer(linears, plan, hessians, shared, cfg, timer, losses))
        _release_weights(linears, out)
        if progress:
            progress(idx + 1, len(layers), f"layer {idx}")
    return out


def _plan_summary(plan: dict | None) -> dict | None:
    if plan is None:
        return None
    keys = ("target", "bits_per_weight", "predicted_cost", "cost", "bits_counted", "scan", "format_counts", "units")
    return {k: plan[k] for k in keys if k in plan}


def _mixed_plan(model_path: str, recipe: Recipe, plan: dict | None,
                scan: str | Path | None, workdir: Path, timer: PhaseTimer, progress: Progress | None):
    """The plan JSON to apply, and report files for the artifact (name → file)."""
    cfg = recipe.quantize
    files: dict[str, Path] = {}
    if plan is None:
        if scan is None:
            with timer.phase("scan"):
                run_scan(model_path, recipe, recipe.sensitivity, workdir / "scan", progress=progress)
            scan = workdir / "scan"
            files = {"reports/sensitivity.json": scan / SCAN_FILE, "reports/sensitivity.png": scan / HEATMAP}
        scan_data, scan_file = load_scan(scan)
        if files:  # the scan run here travels in the artifact
            scan_file = Path("reports/sensitivity.json")
        plan = make_plan(scan_data, scan_file, target_bpw=cfg.target_bpw, max_cost=cfg.max_cost)
    write_json(workdir / "plan.json", plan)
    files["plan.json"] = workdir / "plan.json"
    return plan, files


def run_quantize(model_path: str, recipe: Recipe, out: str | Path, overwrite: bool = False,
                 stats_dir: str | Path | None = None, progress: Progress | None = None,
                 plan: dict | None = None, scan: str | Path | None = None) -> QuantizeResult:
    """Quantize ``model_path`` per ``recipe`` and write the artifact folder ``out``.

    Mixed precision: ``plan`` (a plan JSON) gives each linear its format; otherwise a recipe
    with ``target_bpw``/``max_cost`` plans from ``scan`` (a scan folder), running the recipe's
    sensitivity scan first when none is given.
    """
    out = Path(out)
    check_output_dir(out, overwrite)
    cfg = recipe.quantize
    timer = PhaseTimer()
    start = time.perf_counter()
    with timer.phase("load"):
        loaded = load_model(model_path, lazy=True)
    model = loaded.model
    mixed = plan is not None or cfg.target_bpw is not None or cfg.max_cost is not None
    with tempfile.TemporaryDirectory(prefix="inferkit-plan-") as work:
        if mixed:
            layer_plan, report_files = _mixed_plan(model_path, recipe, plan, scan, Path(work), timer, progress)
            linears = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            ignored = {n for n in linears if cfg.format_for(n) is None}
            formats = plan_layer_formats(layer_plan, linears, ignored, model_fingerprint(loaded))
        else:
            layer_plan, report_files = None, {}
            formats = plan_formats(model, cfg)
        return _quantize_with_plan(loaded, recipe, formats, layer_plan, report_files, out, overwrite, stats_dir,
                                   progress, timer, start)


def _quantize_with_plan(loaded, recipe, plan, layer_plan, report_files, out, overwrite, stats_dir, progress,
                        timer, start) -> QuantizeResult:
    model = loaded.model
    cfg = recipe.quantize
    if not any(plan.values()):
        raise InferkitError("no linear layer is left to quantize: check the ignore list and overrides")
    if stats_dir is not None and cfg.method == "gptq" and _head_linears(model, plan):
        raise InferkitError("saved calibration stats cover the decoder layers only: quantize lm_head "
                            "with sequential GPTQ (no --stats) or RTN, or add it to ignore")
    modules = dict(model.named_modules())
    with timer.phase("load"):
        # Linears kept in full precision are written as they are: read them now.
        loaded.load_weights({name: modules[name] for name, fmt in plan.items() if fmt is None})
    losses: dict[str, float] = {}
    with torch.no_grad():
        if cfg.method == "rtn":
            qweights = quantize_rtn(loaded, plan, cfg, timer, progress)
        elif stats_dir is not None:
            qweights = quantize_gptq_from_stats(loaded, Path(stats_dir), plan, cfg, timer, progress, losses)
        else:
            with timer.phase("calibration_data"):
                samples = build_samples(recipe.calibration, loaded.tokenizer)
            qweights = quantize_gptq_sequential(loaded, samples, plan, cfg, timer, progress, losses)
    scale_bits = torch.finfo(cfg.scale_torch_dtype(model.dtype)).bits
    bpw = bits_per_weight(qweights, scale_bits)
    with timer.phase("write"):
        loaded.restore_embeddings()
        manifest = write_quantized_artifact(
            loaded, qweights, plan, recipe, out, overwrite,
            extra={
                "inferkit_version": __version__,
                "stage": "quantize",
                "method": cfg.method,
                "calibration_stats": Path(stats_dir).name if stats_dir else None,  # not the path: same run, same bytes
                "bits_per_weight": round(bpw, 4),
                "gptq_loss": {k: round(v, 6) for k, v in losses.items()},
                "plan": _plan_summary(layer_plan),
            },
            files=report_files,
        )
    seconds = timer.as_dict()
    seconds["total"] = round(time.perf_counter() - start, 3)
    return QuantizeResult(out, plan, bpw, seconds, peak_rss_mb(), losses, manifest)
