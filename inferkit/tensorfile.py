"""Write safetensors files tensor by tensor, without a second copy of the data in memory.

``safetensors.torch.save_file`` turns every tensor into a ``bytes`` object before writing, so
saving a state dict briefly needs twice its size. Here each tensor's own buffer is handed to
the file as it is. The layout is the safetensors format: an 8-byte little-endian header
length, a JSON header (name → dtype, shape, data offsets; ``__metadata__``) padded with
spaces to a multiple of 8, then the tensors' bytes back to back. Tensors are ordered by
decreasing element size, then name, so each starts aligned to its own element size.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` in the safetensors format."""
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be stored in safetensors by inferkit")
        if t.is_meta:
            raise ValueError(f"{name}: tensor has no data (meta device)")
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            t = tensors[name].detach()
            if t.numel() == 0:
                continue
            t = t.cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(t.numpy()))
