"""Load an inferkit (compressed-tensors pack-quantized) artifact with inferkit's own
dequantization, without the compressed-tensors package."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from inferkit.errors import InferkitError
from inferkit.quant import compressed
from inferkit.quant.scheme import QuantFormat


def is_quantized_artifact(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "compressed-tensors"


def _layer_formats(qconfig: dict, packed_layers: list[str]) -> dict[str, QuantFormat]:
    """Format of every packed layer, from the config groups' targets."""
    formats = {}
    for group in qconfig.get("config_groups", {}).values():
        w = group["weights"]
        fmt = QuantFormat(int(w["num_bits"]), w.get("group_size") if w.get("strategy") == "group" else None, bool(w["symmetric"]))
        for target in group["targets"]:
            for name in packed_layers:
                if target == "Linear" or target == name:
                    formats.setdefault(name, fmt)
    missing = sorted(set(packed_layers) - set(formats))
    if missing:
        raise InferkitError(f"artifact config names no format for packed layer {missing[0]}")
    return formats


def dequantized_state_dict(folder: Path, qconfig: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the artifact, quantized layers turned back into float weights."""
    path = folder / "model.safetensors"
    if not path.is_file():
        raise InferkitError(f"{folder} has no model.safetensors")
    raw = load_file(str(path))
    packed = sorted(k[: -len(".weight_packed")] for k in raw if k.endswith(".weight_packed"))
    formats = _layer_formats(qconfig, packed)
    state = {k: v for k, v in raw.items() if not k.rpartition(".")[2].startswith("weight_")}
    for name in packed:
        parts = {s: raw[f"{name}.{s}"] for s in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point") if f"{name}.{s}" in raw}
        state[f"{name}.weight"] = compressed.decompress(parts, formats[name]).dequantize().to(dtype)
    return state


def load_artifact_model(folder: Path, dtype: torch.dtype = torch.float32):
    """A plain transformers model whose weights are the artifact's dequantized weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw_config = json.loads((folder / "config.json").read_text())
    qconfig = raw_config.get("quantization_config") or {}
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dequantized_state_dict(folder, qconfig, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise InferkitError(f"artifact {folder} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
