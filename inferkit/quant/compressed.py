"""The compressed-tensors ``pack-quantized`` layout: tensors per layer and the config block.

Per quantized linear ``NAME``: ``NAME.weight_packed`` (int32, values packed along the input
dimension), ``NAME.weight_scale`` ([out, groups], the model's dtype), ``NAME.weight_shape``
(int64 [2]) and, when asymmetric, ``NAME.weight_zero_point`` (int32, packed along the output
dimension). Dequantized weight: ``(q - zero_point) * scale`` per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferkit.quant.pack import pack_int32, unpack_int32
from inferkit.quant.rtn import QuantizedWeight
from inferkit.quant.scheme import QuantFormat

FORMAT = "pack-quantized"
CT_VERSION = "0.12.0"  # oldest compressed-tensors release whose loader reads this layout


def compress(qw: QuantizedWeight, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors stored for one layer, keyed by suffix (``weight_packed``, ...)."""
    tensors = {
        "weight_packed": pack_int32(qw.q, qw.fmt.bits, dim=1),
        "weight_scale": qw.scale.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor(list(qw.q.shape), dtype=torch.int64),
    }
    if qw.zero_point is not None:
        tensors["weight_zero_point"] = pack_int32(qw.zero_point, qw.fmt.bits, dim=0)
    return tensors


@dataclass
class PackedWeight:
    """One quantized linear in its stored form: what a quantize run holds until it writes."""

    fmt: QuantFormat
    shape: tuple[int, int]  # [out, in]
    tensors: dict[str, torch.Tensor]  # suffix → tensor, as :func:`compress` gives them

    @classmethod
    def of(cls, qw: QuantizedWeight, scale_dtype: torch.dtype) -> "PackedWeight":
        return cls(qw.fmt, tuple(qw.q.shape), compress(qw, scale_dtype))

    def storage_bits(self, scale_bits: int) -> int:
        return self.fmt.storage_bits(*self.shape, scale_bits)


def decompress(tensors: dict[str, torch.Tensor], fmt: QuantFormat) -> QuantizedWeight:
    """Inverse of :func:`compress`."""
    out_features, in_features = (int(v) for v in tensors["weight_shape"].tolist())
    q = unpack_int32(tensors["weight_packed"], fmt.bits, in_features, dim=1)
    zero = None
    if "weight_zero_point" in tensors:
        zero = unpack_int32(tensors["weight_zero_point"], fmt.bits, out_features, dim=0)
    return QuantizedWeight(q, tensors["weight_scale"].float(), zero, fmt)


def weight_args(fmt: QuantFormat, actorder: bool, scale_search: bool) -> dict:
    args = {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": fmt.symmetric,
        "group_size": fmt.group_size,
        "strategy": "group" if fmt.group_size else "channel",
        "block_structure": None,
        "dynamic": False,
        "actorder": "static" if actorder and fmt.group_size else None,
        "observer": "mse" if scale_search else "memoryless_minmax",
        "observer_kwargs": {},
    }
    if not fmt.symmetric:
        args["zp_dtype"] = "torch.int8"
    return args


def quantization_config(layer_formats: dict[str, QuantFormat | None], actorder: bool, scale_search: bool) -> dict:
    """``quantization_config`` for ``config.json``: one config group per format, exact targets.

    ``layer_formats`` maps every linear layer's name to its format, or None when it stays in
    full precision (those are listed under ``ignore``).
    """
    by_format: dict[QuantFormat, list[str]] = {}
    for name, fmt in layer_formats.items():
        if fmt is not None:
            by_format.setdefault(fmt, []).append(name)
    uniform = len(by_format) == 1
    groups = {}
    for i, (fmt, names) in enumerate(sorted(by_format.items(), key=lambda kv: (kv[0].bits, kv[0].group_size or 0, kv[0].symmetric))):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if uniform else names,
            "weights": weight_args(fmt, actorder, scale_search),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(n for n, f in layer_formats.items() if f is None),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
