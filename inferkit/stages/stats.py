"""Calibration statistics on disk: one safetensors file per decoder layer plus a summary.

``layer_NNN.safetensors`` holds ``NAME.xtx`` ([in, in] float32, the sum of xᵀx over tokens)
and ``NAME.absmax`` ([in]) for each distinct linear input; linears fed the same input
(q/k/v, gate/up) share one entry, recorded in ``stats.json`` under ``shared``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from inferkit.errors import InferkitError
from inferkit.quant.hessian import InputStats

SUMMARY = "stats.json"


def layer_file(folder: Path, idx: int) -> Path:
    return folder / f"layer_{idx:03d}.safetensors"


def save_layer_stats(folder: Path, idx: int, stats: dict[str, InputStats]) -> None:
    tensors = {}
    for name, s in stats.items():
        tensors[f"{name}.xtx"] = s.xtx
        tensors[f"{name}.absmax"] = s.absmax
    save_file(tensors, str(layer_file(folder, idx)), metadata={"tokens": str(next(iter(stats.values())).count)})


def load_layer_stats(folder: Path, idx: int, linears: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Hessians of one layer keyed by owner name, and the name → owner map."""
    summary_path = folder / SUMMARY
    if not summary_path.is_file():
        raise InferkitError(f"{folder} is not a calibration stats folder (no {SUMMARY}); run inferkit calibrate")
    summary = json.loads(summary_path.read_text())
    path = layer_file(folder, idx)
    if not path.is_file():
        raise InferkitError(f"calibration stats {folder} lack layer {idx}; were they made for another model?")
    tensors = load_file(str(path))
    shared = {name: summary["shared"].get(name, name) for name in linears}
    hessians = {}
    for name, owner in shared.items():
        key = f"{owner}.xtx"
        if key not in tensors:
            raise InferkitError(f"calibration stats {folder} have no entry for {name}; were they made for another model?")
        hessians[owner] = tensors[key]
        if hessians[owner].shape[0] != linears[name].in_features:
            raise InferkitError(f"calibration stats for {name} have the wrong width; were they made for another model?")
    return hessians, shared
