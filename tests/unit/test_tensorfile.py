"""The streaming safetensors writer reads back exactly through the safetensors library."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from inferkit.tensorfile import save_safetensors


def test_round_trip_every_dtype(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(5, 7, generator=g),
        "bf16": torch.randn(3, 4, generator=g).bfloat16(),
        "f16": torch.randn(6, generator=g).half(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.tensor([3, -4], dtype=torch.int64),
        "i32": torch.randint(-2**31, 2**31 - 1, (4, 3), generator=g, dtype=torch.int32),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "strided": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
    }
    path = tmp_path / "t.safetensors"
    save_safetensors(tensors, path, metadata={"format": "pt", "n": 3})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "n": "3"}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n  # contiguous data, nothing trailing
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_unsupported_and_meta_tensors_are_refused(tmp_path):
    with pytest.raises(ValueError, match="complex"):
        save_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="meta"):
        save_safetensors({"m": torch.empty(2, device="meta")}, tmp_path / "m.safetensors")
