"""The calibrate stage: run calibration text through the model one decoder layer at a time
and save each linear layer's input statistics."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Callable

import torch

from inferkit import __version__
from inferkit.artifacts import atomic_output_dir, check_output_dir, write_json, write_manifest
from inferkit.data.calibration import CalibrationConfig, build_samples
from inferkit.models import load_model
from inferkit.models.lazy import LazyWeights
from inferkit.stages import layerwise
from inferkit.stages.memory import trim_heap
from inferkit.stages.stats import SUMMARY, save_layer_stats
from inferkit.stages.timer import PhaseTimer


def run_calibrate(model_path: str, calib: CalibrationConfig, out: str | Path, overwrite: bool = False,
                  batch_size: int = 2, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write ``out/layer_NNN.safetensors`` and ``out/stats.json``; returns the summary."""
    out = Path(out)
    check_output_dir(out, overwrite)
    timer = PhaseTimer()
    start = time.perf_counter()
    with timer.phase("load"):
        loaded = load_model(model_path, lazy=True)
    with timer.phase("calibration_data"):
        samples = build_samples(calib, loaded.tokenizer)
    model = loaded.model
    layers_summary: dict[str, dict] = {}
    shared_all: dict[str, str] = {}
    with atomic_output_dir(out, overwrite) as tmp, torch.no_grad():
        with timer.phase("forward"):
            inputs = layerwise.capture_first_inputs(model, samples, batch_size)
        loaded.offload_embeddings()
        layers = layerwise.decoder_layers(model)
        for idx, layer in enumerate(layers):
            linears = layerwise.linear_modules(layer, f"model.layers.{idx}")
            with timer.phase("load"):
                loaded.load_weights(linears)
            stats, shared = layerwise.gather_input_stats(layer, inputs, linears, advance_inputs=True, timer=timer)
            if loaded.weights is not None:
                LazyWeights.release(linears)
            trim_heap()
            with timer.phase("write"):
                save_layer_stats(tmp, idx, stats)
            shared_all.update(shared)
            for name in linears:
                s = stats[shared[name]]
                layers_summary[name] = {
                    "input_of": shared[name],
                    "tokens": s.count,
                    "absmax_max": round(float(s.absmax.max()), 6),
                    "hessian_trace": round(float(torch.diag(s.xtx).sum()), 4),
                }
            if progress:
                progress(idx + 1, len(layers), f"layer {idx}")
        seconds = timer.as_dict()
        seconds["total"] = round(time.perf_counter() - start, 3)
        summary = {
            "inferkit_version": __version__,
            "stage": "calibrate",
            "model": loaded.source.display,
            "calibration": {
                "source": calib.source, "num_samples": calib.num_samples, "seq_len": calib.seq_len,
                "seed": calib.seed, "split": calib.split, "apply_chat_template": calib.apply_chat_template,
            },
            "num_tokens": int(samples.numel()),
            "samples_sha256": _tensor_sha(samples),
            "shared": {k: v for k, v in shared_all.items() if k != v},
            "layers": layers_summary,
            "timings_s": seconds,
        }
        write_json(tmp / SUMMARY, summary)
        write_manifest(tmp, dict(summary))
    return summary


def _tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()
