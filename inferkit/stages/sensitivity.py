"""sensitivity-scan: how much the model suffers when one unit of linears is quantized alone.

For every planning unit (q/k/v together, o, gate/up together, down; or each linear with
``tie=False``) and every candidate format, the unit is quantized with the quantizer the real
run will use (GPTQ with the recipe's settings, or RTN), everything else left in full precision,
and the damage is measured one of three ways:

- ``block`` (default): squared error of the decoder block's output on cached block inputs of
  held-out samples (exllamav2's measurement pass does the same kind of thing), scaled per layer
  so that the layer's units together at their fewest-bit formats cost the next-token KL
  measured for them: raw block errors grow with depth as the residual stream does, what they
  cost the output does not (uncalibrated they ranked units at 0.80 Spearman against KL on the
  demo model, calibrated at 0.975);
- ``kl``: KL divergence of the next-token distribution from the full-precision model's, over
  held-out samples, running the rest of the model from the cached block inputs;
- ``proxy``: the Hessian-weighted weight error ``tr(ΔW H ΔWᵀ)`` per calibration token, i.e.
  the squared output error of the linear itself; no forward pass beyond the statistics.

The scan runs layer by layer, saving each finished layer in ``.OUT.partial/``; an interrupted
scan run again with the same settings continues from the first unfinished layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from inferkit import __version__
from inferkit.artifacts import check_output_dir, move_into_place, write_json
from inferkit.config import Recipe, ScanConfig, matches
from inferkit.data.calibration import build_samples
from inferkit.errors import InferkitError
from inferkit.models import LoadedModel, load_model
from inferkit.models.lazy import LazyWeights
from inferkit.quant.gptq import GPTQConfig, gptq_quantize
from inferkit.quant.planner import Unit, make_units
from inferkit.quant.rtn import quantize_weight_rtn
from inferkit.quant.scheme import QuantFormat, parse_format
from inferkit.stages import layerwise
from inferkit.stages.artifact import input_hashes
from inferkit.stages.memory import trim_heap
from inferkit.stages.stats import SUMMARY, load_layer_stats
from inferkit.stages.timer import PhaseTimer

SCAN_FILE = "scan.json"
TIMINGS = "timings.json"
HEATMAP = "heatmap.png"
Progress = Callable[[int, int, str], None]


def candidate_formats(names: tuple[str, ...], symmetric: bool) -> dict[str, QuantFormat]:
    """Full format name → format, in the order given; symmetry from the recipe unless named."""
    out = {}
    for name in names:
        fmt = parse_format(name)
        if not name.strip().lower().endswith(("-sym", "_sym", "-asym", "_asym")):
            fmt = QuantFormat(fmt.bits, fmt.group_size, symmetric)
        out[fmt.name] = fmt
    return out


def model_fingerprint(loaded: LoadedModel) -> str:
    """sha256 over the hashes of the model's weight, config and tokenizer files."""
    hashes = input_hashes(loaded.source.folder, loaded.source.gguf_file)
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def scan_units(model: nn.Module, recipe: Recipe, tie: bool) -> list[Unit]:
    """Planning units over the linears the recipe would quantize (ignore rules apply)."""
    cfg = recipe.quantize
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not any(matches(p, name) for p in cfg.ignore):
            if not name.startswith("model.layers."):
                raise InferkitError(f"the scan covers the decoder layers only; add {name} to ignore")
            shapes[name] = (mod.out_features, mod.in_features)
    return make_units(shapes, tie)


def _layer_of(name: str) -> int:
    return int(name.split(".")[2])


class _Partial:
    """``.OUT.partial/``: the scan's settings and one JSON file per finished layer."""

    def __init__(self, out: Path, settings: dict, overwrite: bool) -> None:
        self.folder = out.parent / f".{out.name}.partial"
        self.settings = settings
        saved = self.folder / "settings.json"
        if self.folder.exists():
            same = saved.is_file() and json.loads(saved.read_text()) == settings
            if not same and not overwrite:
                raise InferkitError(f"an interrupted scan with other settings is in {self.folder}; "
                                    "rerun with its settings to resume, or pass --overwrite to start over")
            if not same:
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(saved, settings)

    def _file(self, idx: int) -> Path:
        return self.folder / f"layer_{idx:03d}.json"

    def done(self, idx: int) -> dict | None:
        path = self._file(idx)
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, idx: int, data: dict) -> None:
        tmp = self._file(idx).with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self._file(idx))

    def finish(self, out: Path) -> None:
        for path in self.folder.glob("layer_*.json"):
            path.unlink()
        (self.folder / "settings.json").unlink()
        move_into_place(self.folder, out)


def _quantize_unit(unit: Unit, linears: dict[str, nn.Linear], fmt: QuantFormat, hessians, shared, recipe: Recipe):
    """Dequantized weight of each member, and the summed proxy ``tr(ΔW H ΔWᵀ)`` (None without H)."""
    cfg = recipe.quantize
    out, proxy = {}, 0.0
    for name in unit.members:
        w = linears[name].weight.data
        h = hessians.get(shared.get(name, name)) if hessians is not None else None
        scale_dtype = cfg.scale_torch_dtype(w.dtype)
        if cfg.method == "gptq":
            qw, _ = gptq_quantize(w, h, fmt, GPTQConfig(cfg.damp, cfg.block_size, cfg.actorder, cfg.scale_search, scale_dtype))
        else:
            qw = quantize_weight_rtn(w, fmt, cfg.scale_search, scale_dtype=scale_dtype)
        deq = qw.dequantize().to(w.dtype)
        out[name] = deq
        if h is not None:
            delta = (deq - w).float()
            proxy += float(((delta @ h.float()) * delta).sum())
    return out, (proxy if hessians is not None else None)


def _block_error(layer: nn.Module, inputs: layerwise.LayerInputs, reference: list[torch.Tensor]) -> float:
    err, count = 0.0, 0
    for i, kwargs in enumerate(inputs.kwargs):
        out = layer(inputs.hidden[i], **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        err += float((out - reference[i]).double().pow(2).sum())
        count += out.numel()
    return err / count


def _tail_logprobs(model: nn.Module, start: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    for layer in layerwise.decoder_layers(model)[start:]:
        out = layer(hidden, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
    return torch.log_softmax(model.lm_head(model.model.norm(hidden)).float(), dim=-1)


def _kl(model: nn.Module, start: int, inputs: layerwise.LayerInputs, ref: list[torch.Tensor]) -> float:
    total, tokens = 0.0, 0
    for i, kwargs in enumerate(inputs.kwargs):
        logq = _tail_logprobs(model, start, inputs.hidden[i], kwargs)
        logp = ref[i]
        total += float((logp.exp() * (logp - logq)).sum())
        tokens += logp.shape[0] * logp.shape[1]
    return total / tokens


def run_scan(model_path: str, recipe: Recipe, scan: ScanConfig, out: str | Path, overwrite: bool = False,
             stats_dir: str | Path | None = None, progress: Progress | None = None) -> dict:
    """Measure every unit at every candidate format; writes ``out/scan.json`` and the heatmap."""
    out = Path(out)
    check_output_dir(out, overwrite)
    cfg = recipe.quantize
    timer = PhaseTimer()
    start = time.perf_counter()
    with timer.phase("load"):
        loaded = load_model(model_path, lazy=True)
    model = loaded.model
    formats = candidate_formats(scan.formats, cfg.symmetric)
    units = scan_units(model, recipe, scan.tie)
    if not units:
        raise InferkitError("no linear layer is left to scan: check the ignore list")
    eval_n, eval_seq = scan.eval_shape()
    need_hessians = cfg.method == "gptq" or scan.mode == "proxy"
    settings = {
        "model_fingerprint": model_fingerprint(loaded),
        "mode": scan.mode, "method": cfg.method, "tie": scan.tie, "formats": list(formats),
        "quantize": {k: v for k, v in asdict(cfg).items() if k in ("damp", "block_size", "actorder", "scale_search", "symmetric", "batch_size", "scale_dtype")},
        "ignore": list(cfg.ignore),
        "calibration": asdict(recipe.calibration) if need_hessians and stats_dir is None else None,
        "stats": str(Path(stats_dir).resolve()) if need_hessians and stats_dir is not None else None,
        "eval": {"samples": eval_n, "seq_len": eval_seq} if scan.mode != "proxy" else None,
    }
    partial = _Partial(out, settings, overwrite)
    # Saved stats hold the summed XᵀX; the proxy is per token, as for Hessians gathered here.
    stats_tokens = _stats_tokens(Path(stats_dir)) if stats_dir is not None and need_hessians else 1
    by_layer: dict[int, list[Unit]] = {}
    for unit in units:
        by_layer.setdefault(_layer_of(unit.members[0]), []).append(unit)

    with torch.no_grad():
        calib = evals = None
        if need_hessians and stats_dir is None:
            with timer.phase("calibration_data"):
                samples = build_samples(recipe.calibration, loaded.tokenizer)
            with timer.phase("forward"):
                calib = layerwise.capture_first_inputs(model, samples, cfg.batch_size)
        if scan.mode != "proxy":
            eval_cfg = replace(recipe.calibration, split="heldout", num_samples=eval_n, seq_len=eval_seq,
                               seed=recipe.calibration.seed + 1)
            with timer.phase("calibration_data"):
                eval_samples = build_samples(eval_cfg, loaded.tokenizer)
            with timer.phase("forward"):
                evals = layerwise.capture_first_inputs(model, eval_samples, cfg.batch_size)
        ref = None
        if scan.mode in ("kl", "block"):
            # kl: the reference distribution for every eval batch; block: for the first batch
            # only, which calibrates each layer's block errors to next-token KL.
            with timer.phase("load"):
                loaded.load_weights({n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            batches = len(evals.hidden) if scan.mode == "kl" else 1
            with timer.phase("reference"):
                ref = [_tail_logprobs(model, 0, h, kw) for h, kw in zip(evals.hidden[:batches], evals.kwargs[:batches])]
        else:
            loaded.offload_embeddings()
        trim_heap()

        layers = layerwise.decoder_layers(model)
        costs: dict[str, dict[str, float]] = {}
        calibration: dict[int, dict] = {}
        for idx, layer in enumerate(layers):
            linears = layerwise.linear_modules(layer, f"model.layers.{idx}")
            with timer.phase("load"):
                loaded.load_weights(linears)
            saved = partial.done(idx)
            hessians, shared = None, {}
            if stats_dir is not None and need_hessians and saved is None:
                with timer.phase("load_stats"):
                    hessians, shared = load_layer_stats(Path(stats_dir), idx, linears)
            elif calib is not None:
                if saved is None:
                    stats, shared = layerwise.gather_input_stats(layer, calib, linears, advance_inputs=True, timer=timer)
                    hessians = {k: v.xtx / v.count for k, v in stats.items()}
                    del stats
                else:
                    with timer.phase("forward"):
                        layerwise.advance(layer, calib)
            if hessians is not None and stats_dir is not None:
                hessians = {k: v / stats_tokens for k, v in hessians.items()}
            reference = None
            if evals is not None:
                with timer.phase("forward"):
                    reference = [_first(layer(h, **kw)).clone() for h, kw in zip(evals.hidden, evals.kwargs)]
            if saved is None:
                saved = _scan_layer(model, idx, layer, linears, by_layer.get(idx, []), formats, hessians, shared,
                                    recipe, scan.mode, evals, reference, ref, timer)
                partial.save(idx, saved)
            costs.update(saved["costs"])
            if "calibration" in saved:
                calibration[idx] = saved["calibration"]
            if reference is not None:
                for i, r in enumerate(reference):
                    evals.hidden[i].copy_(r)  # the next layer's full-precision inputs
            del reference
            if scan.mode == "proxy" and loaded.weights is not None:
                LazyWeights.release(linears)
            trim_heap()
            if progress:
                progress(idx + 1, len(layers), f"layer {idx}")

        seconds = timer.as_dict()
        seconds["total"] = round(time.perf_counter() - start, 3)
        result = {
            "kind": "inferkit-sensitivity-scan",
            "inferkit_version": __version__,
            "model": {"path": loaded.source.display, "fingerprint": settings["model_fingerprint"]},
            **{k: v for k, v in settings.items() if k != "model_fingerprint"},
            "scale_bits": torch.finfo(cfg.scale_torch_dtype(model.dtype)).bits,
            "cost": {
                "block": ("squared error of the decoder block's output over the held-out samples, scaled per layer "
                          "to next-token KL (nats per token): the layer's units quantized together at their "
                          "fewest-bit formats give the KL measured for them"),
                "kl": "mean KL divergence (nats per token) of the next-token distribution from full precision",
                "proxy": "tr(ΔW H ΔWᵀ) per calibration token: squared output error of the unit's linears",
            }[scan.mode],
            "units": [{"name": u.name, "layer": _layer_of(u.members[0]), "members": list(u.members),
                       "shapes": [list(s) for s in u.shapes]} for u in units],
            "costs": {u.name: costs[u.name] for u in units},
        }
        if calibration:
            result["layer_calibration"] = {str(k): v for k, v in sorted(calibration.items())}
        # Timings apart, so the same inputs give a byte-identical scan.json.
        write_json(partial.folder / SCAN_FILE, result)
        write_json(partial.folder / TIMINGS, {"timings_s": seconds})
        try:
            from inferkit.report.heatmap import write_heatmap

            write_heatmap(result, partial.folder / HEATMAP)
        except ImportError:
            result["heatmap"] = "not drawn: matplotlib is not installed"
            write_json(partial.folder / SCAN_FILE, result)
        partial.finish(out)
    return {**result, "timings_s": seconds}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _stats_tokens(stats_dir: Path) -> int:
    if not (stats_dir / SUMMARY).is_file():
        raise InferkitError(f"{stats_dir} is not a calibration stats folder (no {SUMMARY}); run inferkit calibrate")
    summary = json.loads((stats_dir / SUMMARY).read_text())
    return max(1, int(summary.get("num_tokens", 1)))


def _scan_layer(model, idx, layer, linears, units, formats, hessians, shared, recipe, mode, evals, reference, ref, timer) -> dict:
    """``{"costs": unit → format → cost}``, plus for block mode the layer's KL calibration."""
    costs: dict[str, dict[str, float]] = {}
    fewest: dict[str, tuple[str, dict]] = {}  # unit → (its fewest-bit format, dequantized weights)
    for unit in units:
        originals = {name: linears[name].weight for name in unit.members}
        row = {}
        for fname, fmt in formats.items():
            if not unit.fits(fmt):
                continue
            with timer.phase("solve"):
                deq, proxy = _quantize_unit(unit, linears, fmt, hessians, shared, recipe)
            bits = unit.bits(fmt, 16)
            if unit.name not in fewest or bits < unit.bits(formats[fewest[unit.name][0]], 16):
                fewest[unit.name] = (fname, deq)
            if mode == "proxy":
                row[fname] = proxy
                continue
            for name, w in deq.items():
                linears[name].weight = nn.Parameter(w, requires_grad=False)
            try:
                with timer.phase("measure"):
                    row[fname] = _block_error(layer, evals, reference) if mode == "block" else _kl(model, idx, evals, ref)
            finally:
                for name, w in originals.items():
                    linears[name].weight = w
        costs[unit.name] = row
    if mode != "block" or not units:
        return {"costs": costs}
    # Block errors grow with depth (the residual stream does) while what a layer's error costs
    # the output does not: measure the next-token KL of the layer's units quantized together
    # at their fewest-bit formats and scale the layer's block errors to it.
    originals = {name: mod.weight for name, mod in linears.items()}
    for _, deq in fewest.values():
        for name, w in deq.items():
            linears[name].weight = nn.Parameter(w, requires_grad=False)
    try:
        with timer.phase("measure"):
            first = layerwise.LayerInputs(evals.hidden[:1], evals.kwargs[:1])
            kl = _kl(model, idx, first, ref)
    finally:
        for name, w in originals.items():
            linears[name].weight = w
    block = sum(costs[u][f] for u, (f, _) in fewest.items())
    scale = kl / block if block > 0 else 0.0
    scaled = {u: {f: c * scale for f, c in row.items()} for u, row in costs.items()}
    return {"costs": scaled, "calibration": {"kl": kl, "block_sum": block, "scale": scale,
                                              "formats": {u: f for u, (f, _) in fewest.items()}}}
