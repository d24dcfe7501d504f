"""Linear layers over the artifact's weights: dense, and quantized ones that keep the weights
packed (INT8 as int8, INT4 as two values per byte) and dequantize them for each call.

Three backends behind one ``__call__(x)``:

- ``torch``: dequantized per call into a scratch buffer shared by all layers of a shape (it
  stays in the CPU's cache), then one matmul; per-channel scales are applied to the output. On
  the CPU the matmul goes through oneDNN's inner product when torch has it: measured 15-45%
  faster than ``F.linear`` for 1-16 rows on this project's 2-core machine.
- ``reference``: the compressed-tensors words as stored, unpacked and dequantized per group on
  every call, then ``F.linear``: slow, obviously right, the ground truth in tests.
- ``triton``: the stored int32 words go to a Triton kernel that unpacks and dequantizes them in
  registers (``inferkit.kernels.quant_matmul``): INT4/INT8, the GPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from inferkit.quant import compressed
from inferkit.quant.scheme import QuantFormat

_SCRATCH: dict[tuple, torch.Tensor] = {}


def _onednn_works() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(1, 2), torch.ones(3, 2)
        return torch.backends.mkldnn.is_available() and bool((op(x, w, None, "none", [], "") == 2).all())
    except (AttributeError, RuntimeError):
        return False


_ONEDNN = _onednn_works()


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight [out, in]^T (+ bias)."""
    if _ONEDNN and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (shape, dtype, device)
    buf = _SCRATCH.get(key)
    if buf is None:
        buf = _SCRATCH[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


class DenseLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight.contiguous()  # [out, in]
        self.bias = bias
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return matmul(x, self.weight, self.bias)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class QuantLinear:
    """INT2-8 weights, grouped or per channel, symmetric or with zero points (``torch`` backend).

    ``codes`` are the signed integers [out, in] as int8. They are kept as int8, or for 4 bits
    (even input size) as uint8 [out, in/2] with column 2i in the low nibble, 2i+1 in the high.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 fmt: QuantFormat, dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
        out_features, in_features = codes.shape
        self.in_features, self.out_features, self.fmt, self.dtype, self.bias = in_features, out_features, fmt, dtype, bias
        self.num_groups = fmt.num_groups(in_features)
        offset = 0
        if fmt.bits == 4 and in_features % 2 == 0:
            u = (codes.to(torch.int16) + 8).to(torch.uint8)  # 0..15
            self.packed = (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()
            offset = 8
        else:
            self.packed = codes.contiguous()
        # Integer subtracted per group before scaling: the nibble offset plus the zero point.
        sub = torch.full((out_features, self.num_groups), float(offset))
        if zero_point is not None:
            sub = sub + zero_point.float()
        self.sub = sub.unsqueeze(-1).to(dtype).contiguous() if sub.any() else None  # [out, groups, 1]
        self.scale = scale.float().unsqueeze(-1).to(dtype).contiguous()  # [out, groups, 1]

    def dequantize(self) -> torch.Tensor:
        """The float weight [out, in], in a scratch buffer overwritten by the next call."""
        buf = _scratch((self.out_features, self.in_features), self.dtype, self.packed.device)
        if self.packed.dtype == torch.uint8:
            pairs = buf.view(self.out_features, self.in_features // 2, 2)
            pairs[..., 0].copy_(self.packed & 15)
            pairs[..., 1].copy_(self.packed >> 4)
        else:
            buf.copy_(self.packed)
        grouped = buf.view(self.out_features, self.num_groups, -1)
        if self.sub is not None:
            grouped.sub_(self.sub)
        if self.num_groups > 1:
            grouped.mul_(self.scale)
        return buf

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.num_groups > 1:
            return matmul(x, self.dequantize(), self.bias)
        y = matmul(x, self.dequantize()) * self.scale[:, 0, 0]
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale) + ((self.sub,) if self.sub is not None else ()))


_PACKED_OPS = all(hasattr(torch.ops.aten, op) for op in ("_convert_weight_to_int4pack_for_cpu",
                                                          "_weight_int4pack_mm_for_cpu", "_weight_int8pack_mm"))


def _int4pack_group(fmt: QuantFormat, in_features: int) -> int | None:
    """The group size PyTorch's packed INT4 CPU kernel can run this format with (32-256; a
    per-channel or larger group is expressed as several groups with the same scale), or None."""
    g = fmt.group_size if fmt.num_groups(in_features) > 1 else in_features
    for size in (256, 128, 64, 32):
        if g % size == 0 and in_features % size == 0:
            return size
    return None


class PackedCPULinear:
    """INT4 (groups of 32-256 inputs, or any multiple: per channel too) and symmetric per-channel
    INT8 weights through PyTorch's packed CPU matmuls (``_weight_int4pack_mm_for_cpu``,
    ``_weight_int8pack_mm``): the weights stay packed (INT4 two per byte, INT8 as int8), the
    activations enter in bfloat16 and the output returns to the engine's dtype. On this project's
    2-core AVX2 machine a decode step's INT4 matmuls run about 10x faster than dequantizing into a
    scratch buffer; the products see bfloat16 inputs and outputs, so logits differ from the exact
    path by bfloat16 rounding (W4 demo model, ``benchmarks/runtime.py``: the top token agrees at
    98.8% of positions, the mean token loss rises by 0.03%).

    Each layer is checked once when it is built against the exact dequantized product (the
    kernels have shape limits, e.g. INT8 inputs in multiples of 32, that fail silently), and the
    loader keeps the exact ``QuantLinear`` for any layer that does not pass."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 fmt: QuantFormat, dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = codes.shape
        self.fmt, self.dtype, self.bias = fmt, dtype, bias
        if fmt.bits == 4:
            self.group = _int4pack_group(fmt, self.in_features)
            repeat = self.in_features // self.group // scale.shape[1]  # groups per stored scale
            s = scale.float().repeat_interleave(repeat, dim=1)
            # the kernel computes (u - 8) * s + z on unsigned u = q + 8; (q - zp) * s needs z = -zp * s
            z = -(zero_point.float().repeat_interleave(repeat, dim=1) * s) if zero_point is not None else torch.zeros_like(s)
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32) + 8, 1)
            self.scale = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16).contiguous()  # [groups, out, 2]
        else:
            self.weight = codes.to(torch.int8).contiguous()
            self.scale = scale.float()[:, 0].to(torch.bfloat16).contiguous()

    @staticmethod
    def supports(fmt: QuantFormat, out_features: int, in_features: int, has_zero_point: bool) -> bool:
        if not _PACKED_OPS:
            return False
        if fmt.bits == 4:
            return out_features % 16 == 0 and _int4pack_group(fmt, in_features) is not None
        return fmt.bits == 8 and fmt.num_groups(in_features) == 1 and not has_zero_point and in_features % 32 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16).contiguous()
        if self.fmt.bits == 4:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.weight, self.group, self.scale)
        else:
            y = torch.ops.aten._weight_int8pack_mm(xb, self.weight, self.scale)
        y = y.to(self.dtype)
        return y if self.bias is None else y + self.bias

    def agrees_with(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> bool:
        """Whether this layer's output matches the exact product ``x @ ((q - zero) * scale).T``
        (float32, computed here from the integers) on random inputs, to bfloat16 rounding."""
        from inferkit.quant.rtn import dequantize

        w = dequantize(codes, scale, zero_point, self.fmt)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, self.in_features, generator=g).to(torch.bfloat16).to(self.dtype)
        with torch.inference_mode():
            ref = x.float() @ w.T
            got = self(x).float() - (self.bias.float() if self.bias is not None else 0.0)
        return bool(torch.isfinite(got).all()) and float((got - ref).norm() / ref.norm().clamp_min(1e-30)) < 2e-2

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * self.scale.element_size()


class ReferenceQuantLinear:
    """The stored compressed-tensors tensors, dequantized per group on every call."""

    def __init__(self, tensors: dict[str, torch.Tensor], fmt: QuantFormat, dtype: torch.dtype,
                 bias: torch.Tensor | None = None) -> None:
        self.tensors, self.fmt, self.dtype, self.bias = tensors, fmt, dtype, bias
        self.out_features, self.in_features = (int(v) for v in tensors["weight_shape"].tolist())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        cpu = {k: v.cpu() for k, v in self.tensors.items()}
        weight = compressed.decompress(cpu, self.fmt).dequantize().to(device=x.device, dtype=self.dtype)
        return matmul(x, weight, self.bias)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class ConcatLinear:
    """Several linears on the same input whose outputs are concatenated (a fused q/k/v or
    gate/up projection whose parts cannot be merged: mixed formats, or the reference backend)."""

    def __init__(self, parts: list) -> None:
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)


class TritonQuantLinear:
    """INT4/INT8 weights kept in the artifact's packing (int32 words along the input), multiplied
    by the Triton dequantizing kernel. Zero points are kept unpacked ([out, groups], tiny)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 fmt: QuantFormat, in_features: int, dtype: torch.dtype, bias: torch.Tensor | None = None) -> None:
        self.packed = packed.contiguous()  # int32 [out, in * bits / 32]
        self.out_features, self.in_features = packed.shape[0], in_features
        self.scale = scale.to(dtype).contiguous()  # [out, groups]
        self.zero = zero_point.to(dtype).contiguous() if zero_point is not None else None
        self.fmt, self.bias = fmt, bias
        self.group_size = fmt.group_size if fmt.num_groups(in_features) > 1 else None
        self.pdl: bool | None = None  # True: launched for PDL (the engine's pdl option); None: as the table says

    @staticmethod
    def supports(fmt: QuantFormat, in_features: int) -> bool:
        if fmt.bits not in (4, 8) or in_features % (32 // fmt.bits):
            return False
        groups = fmt.num_groups(in_features)
        g = fmt.group_size
        return groups == 1 or (g is not None and g & (g - 1) == 0 and in_features % g == 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from inferkit.kernels.quant_matmul import quant_matmul

        return quant_matmul(x, self.packed, self.scale, self.zero, self.fmt.bits, self.group_size, self.bias,
                            pdl=self.pdl)

    def nbytes(self) -> int:
        parts = (self.packed, self.scale) + ((self.zero,) if self.zero is not None else ())
        return sum(t.numel() * t.element_size() for t in parts)
