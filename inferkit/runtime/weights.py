"""Read a model folder (an inferkit artifact or a plain Hugging Face safetensors folder) into
the runtime's linear layers, checking the artifact's manifest first."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from inferkit.errors import InferkitError
from inferkit.quant.scheme import QuantFormat
from inferkit.quant import compressed
from inferkit.runtime.linear import (ConcatLinear, DenseLinear, PackedCPULinear, QuantLinear, ReferenceQuantLinear,
                                     TritonQuantLinear)

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def verify_manifest(folder: Path) -> None:
    """Raise unless every file the manifest lists exists with its recorded sha256."""
    from inferkit.artifacts import MANIFEST, sha256_file

    path = folder / MANIFEST
    if not path.is_file():
        return
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InferkitError(f"{path} is not valid JSON: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        raise InferkitError(f"{path} has no valid 'files' table")
    for rel, entry in files.items():
        f = folder / rel
        if not f.is_file():
            raise InferkitError(f"artifact {folder}: {rel} is listed in {MANIFEST} but missing")
        digest = sha256_file(f)
        if digest != entry.get("sha256"):
            raise InferkitError(f"artifact {folder}: {rel} does not match its manifest hash "
                                f"(sha256 {digest[:12]}…, manifest {str(entry.get('sha256'))[:12]}…): "
                                "the file was changed or corrupted")


class Checkpoint:
    """The tensors of a folder's model.safetensors or sharded model-*.safetensors files."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise InferkitError(f"{folder} has no model.safetensors (the runtime reads safetensors folders; "
                                "convert a .gguf first with `inferkit quantize` or transformers)")
        self.where: dict[str, object] = {}
        self._handles = []
        for name in files:
            handle = safe_open(str(folder / name), framework="pt")
            self._handles.append(handle)
            for key in handle.keys():
                self.where[key] = handle

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise InferkitError(f"the checkpoint has no tensor {name}")
        return self.where[name].get_tensor(name)


class LinearLoader:
    """Builds linear layers from a checkpoint, fusing parts that share a format."""

    def __init__(self, ckpt: Checkpoint, formats: dict[str, QuantFormat], dtype: torch.dtype,
                 device: torch.device, backend: str) -> None:
        self.ckpt, self.formats, self.dtype, self.device, self.backend = ckpt, formats, dtype, device, backend

    def _bias(self, name: str) -> torch.Tensor | None:
        key = f"{name}.bias"
        return self.ckpt.get(key).to(self.device, self.dtype) if key in self.ckpt else None

    def is_packed(self, name: str) -> bool:
        return f"{name}.weight_packed" in self.ckpt

    def _tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {s: self.ckpt.get(f"{name}.{s}") for s in PACKED_SUFFIXES if f"{name}.{s}" in self.ckpt}

    def load(self, names: list[str]):
        """One layer computing ``cat([name(x) for name in names])``."""
        packed = [self.is_packed(n) for n in names]
        fmts = {self.formats.get(n) for n in names}
        if not any(packed):
            weight = torch.cat([self.ckpt.get(f"{n}.weight") for n in names]).to(self.device, self.dtype)
            return DenseLinear(weight, self._cat_bias(names))
        if self.backend == "reference":
            parts = [ReferenceQuantLinear({k: v.to(self.device) for k, v in self._tensors(n).items()}, self.formats[n],
                                          self.dtype, self._bias(n)) if p else self.load([n]) for n, p in zip(names, packed)]
            return parts[0] if len(parts) == 1 else ConcatLinear(parts)
        if all(packed) and len(fmts) == 1 and self.backend == "triton":
            fmt = next(iter(fmts))
            tensors = [self._tensors(n) for n in names]
            in_features = int(tensors[0]["weight_shape"][1])
            if TritonQuantLinear.supports(fmt, in_features):
                zeros = None
                if "weight_zero_point" in tensors[0]:
                    zeros = torch.cat([compressed.decompress(t, fmt).zero_point for t in tensors])
                return TritonQuantLinear(torch.cat([t["weight_packed"] for t in tensors]).to(self.device),
                                         torch.cat([t["weight_scale"] for t in tensors]).to(self.device),
                                         None if zeros is None else zeros.to(self.device), fmt, in_features,
                                         self.dtype, self._cat_bias(names))
        if all(packed) and len(fmts) == 1:
            fmt = fmts.pop()
            parts = [compressed.decompress(self._tensors(n), fmt) for n in names]
            zero = torch.cat([p.zero_point for p in parts]) if parts[0].zero_point is not None else None
            codes, scale, bias = torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), self._cat_bias(names)
            if self.backend == "packed" and PackedCPULinear.supports(fmt, *codes.shape, zero is not None):
                fast = PackedCPULinear(codes, scale, zero, fmt, self.dtype, bias)
                if fast.agrees_with(codes, scale, zero):
                    return fast
            return _to(QuantLinear(codes, scale, zero, fmt, self.dtype, bias), self.device)
        return ConcatLinear([self.load([n]) for n in names])

    def _cat_bias(self, names: list[str]) -> torch.Tensor | None:
        biases = [self._bias(n) for n in names]
        if all(b is None for b in biases):
            return None
        if any(b is None for b in biases):
            raise InferkitError(f"only some of {names} have a bias")
        return torch.cat(biases)


def _to(layer: QuantLinear, device: torch.device) -> QuantLinear:
    for attr in ("packed", "scale", "sub", "bias"):
        value = getattr(layer, attr)
        if value is not None:
            setattr(layer, attr, value.to(device))
    return layer
