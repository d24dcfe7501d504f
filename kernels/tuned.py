"""Measured tile configs for the dequantizing matmul, one JSON table per GPU model.

``pick_config``'s tiles are a heuristic. ``benchmarks/gpu_kernels.py`` times a sweep of configs
per shape on the GPU it runs on and writes the fastest of each as a table
(``<out>/tuned/<device>.json``), as ``inferkit tune-kernels`` does for a model's own shapes
(``inferkit.kernels.tune``); tables committed under ``kernels/configs/`` ship with the package,
and ``INFERKIT_KERNEL_CONFIGS`` (a table, or a folder of them) adds more, taking precedence. A
launch uses a table's entry when one matches its GPU model (by name, as CUDA reports it), bits,
group size, N and K, and row bucket; anything else falls back to the heuristic.

Table format::

    {"device": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "source": "benchmarks/gpu_kernels.py",
     "configs": [{"bits": 4, "group": 128, "K": 4096, "N": 14336, "M": 1,
                  "BN": 64, "BK": 128, "SPLIT_K": 4, "num_warps": 4, "VEC_X": true, "us": 12.5}]}

``group`` is K for per-channel scales; ``KERNEL`` (optional) is ``gemv``, ``mma`` or ``swap``, the
GEMV kernel being the default up to 4 rows and allowed only there, ``swap`` (INT4 on the tensor
cores with the weights as the first operand, any row count; its ``BK`` at most the group size)
never a default; ``REG_CAP`` (optional) the GEMV's
registers per thread (0: none; without it, ``quant_matmul.gemv_register_cap`` decides); ``PREFETCH``
(optional, 1-3, default 1) how many tiles ahead the GEMV loads its words into registers;
``STAGES`` (optional, 0 or 2-5, default 0) the GEMV's pipelined loop instead (cp.async through
shared memory), or the MMA kernel's pipeline stages (2-5, default 2), or the swap kernel's
(1-5, default 1: no pipelining); ``PDL`` (optional, default false) a programmatic dependent
launch on sm_90+ (the kernel starts while the one before it finishes, reads its first weights,
then waits for it). Row buckets: 1, 2, 3, 4 exactly;
then 5-16, 17-32 and 33-64 (the MMA kernel), an entry measured at any row count in a bucket
serving the whole bucket. Above 64 rows the heuristic always decides (compute-bound tiles, and a
bounded number of compiled variants for mixed prefill steps).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path

ENV = "INFERKIT_KERNEL_CONFIGS"
PACKAGED = Path(__file__).with_name("configs")
_INTS = ("bits", "group", "K", "N", "M", "BN", "BK", "SPLIT_K", "num_warps")
TILE = ("BN", "BK", "SPLIT_K", "num_warps")  # a config's keys an entry always has
OPTIONAL = ("VEC_X", "ONE_DOT", "KERNEL", "REG_CAP", "PREFETCH", "STAGES", "PDL")  # and those it may have
PREFETCH_AHEAD = (1, 2, 3)  # the GEMV's PREFETCH: tiles loaded ahead into registers
PIPELINE_STAGES = (2, 3, 4, 5)  # a pipelined loop's STAGES (the GEMV's also 0: PREFETCH's loop)
SWAP_STAGES = (1, *PIPELINE_STAGES)  # the swap kernel's (1: its loads are not pipelined)


def slug(device_name: str) -> str:
    """A table's file name stem for a GPU model name: ``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_")


def bucket(M: int) -> int | None:
    """The row bucket a config serves (None: above 64 rows, the heuristic's)."""
    if M <= 4:
        return M
    for top in (16, 32, 64):
        if M <= top:
            return top
    return None


def kernel_for(M: int, cfg: dict) -> str | None:
    """The kernel a config launches for M rows: its ``KERNEL``, else the GEMV up to 4 rows and
    the MMA kernel above; None when ``KERNEL`` names no kernel, or the GEMV above 4 rows."""
    kernel = cfg.get("KERNEL", "gemv" if M <= 4 else "mma")
    return kernel if kernel in ("mma", "swap") or (kernel == "gemv" and M <= 4) else None


def _check(entry: dict, where: str) -> dict:
    """An entry with its fields checked; a bad one is a clear error naming the table."""
    bad = lambda why: ValueError(f"{where}: config {entry!r}: {why}")  # noqa: E731
    if not isinstance(entry, dict):
        raise bad("not an object")
    for key in _INTS:
        if not isinstance(entry.get(key), int) or isinstance(entry.get(key), bool) or entry[key] < 1:
            raise bad(f"'{key}' must be a positive integer")
    if entry["bits"] not in (4, 8):
        raise bad("'bits' must be 4 or 8")
    vals = 32 // entry["bits"]
    for key in ("BN", "BK"):
        if entry[key] & (entry[key] - 1):
            raise bad(f"'{key}' must be a power of two")
    kernel = kernel_for(entry["M"], entry)
    if kernel is None:
        raise bad("'KERNEL' must be 'mma', 'swap', or 'gemv' for up to 4 rows")
    if entry["BK"] % vals or entry["BK"] // vals < (16 if kernel == "mma" else 1):
        raise bad(f"'BK' must hold whole words ({vals} values), at least 16 of them for the MMA kernel")
    if kernel == "swap" and (entry["bits"] != 4 or entry["BK"] < 16 or entry["BK"] > entry["group"]):
        raise bad("the swap kernel takes 4 bits and a 'BK' of 16 values up to the group size")
    if entry["num_warps"] not in (1, 2, 4, 8, 16) or entry["SPLIT_K"] > 64:
        raise bad("'num_warps' must be 1-16 (a power of two) and 'SPLIT_K' at most 64")
    if bucket(entry["M"]) is None:
        raise bad("'M' above 64: large row counts are left to the heuristic")
    for key in ("VEC_X", "ONE_DOT", "PDL"):
        if key in entry and not isinstance(entry[key], bool):
            raise bad(f"'{key}' must be true or false")
    if "REG_CAP" in entry and (isinstance(entry["REG_CAP"], bool) or entry["REG_CAP"] not in (0, *range(24, 256, 8))):
        raise bad("'REG_CAP' must be 0 (no cap) or a multiple of 8 registers from 24 to 248")
    if "PREFETCH" in entry and (isinstance(entry["PREFETCH"], bool) or entry["PREFETCH"] not in PREFETCH_AHEAD):
        raise bad("'PREFETCH' must be 1, 2 or 3 tiles ahead")
    if kernel != "swap" and "STAGES" in entry and (
            isinstance(entry["STAGES"], bool) or entry["STAGES"] not in (0, *PIPELINE_STAGES)
            or entry["STAGES"] and entry.get("PREFETCH", 1) != 1):
        raise bad("'STAGES' must be 0 or 2-5 (the pipelined GEMV loop, which takes no 'PREFETCH')")
    if kernel == "mma" and entry.get("STAGES", 2) not in PIPELINE_STAGES:
        raise bad("'STAGES' of the MMA kernel must be 2-5")
    if kernel == "swap" and (isinstance(entry.get("STAGES"), bool) or entry.get("STAGES", 1) not in SWAP_STAGES):
        raise bad("'STAGES' of the swap kernel must be 1-5")
    return entry


def read_table(path: Path) -> tuple[str, list[dict]]:
    """(device name, checked entries) of one table file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON kernel-config table ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("device"), str) or not isinstance(data.get("configs"), list):
        raise ValueError(f"{path}: a kernel-config table needs a 'device' name and a 'configs' list")
    return data["device"], [_check(e, str(path)) for e in data["configs"]]


def _tables(device_name: str) -> list[Path]:
    """The tables for a GPU model, the override's first."""
    name = slug(device_name) + ".json"
    found = []
    override = os.environ.get(ENV)
    if override:
        p = Path(override)
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += [p / name] if (p / name).is_file() else []
        else:
            raise ValueError(f"{ENV}={override}: no such file or folder")
    if (PACKAGED / name).is_file():
        found.append(PACKAGED / name)
    return found


@functools.lru_cache(maxsize=64)
def _index(device_name: str) -> dict:
    index: dict = {}
    for path in reversed(_tables(device_name)):  # the override last, so its entries win
        table_device, entries = read_table(path)
        if table_device != device_name:
            continue  # a table for another model (an override file may be any GPU's)
        for e in entries:
            index[(e["bits"], e["group"], e["N"], e["K"], bucket(e["M"]))] = e
    return index


def lookup(M: int, N: int, K: int, group: int, bits: int, device_name: str | None) -> dict | None:
    """The measured config for this launch on this GPU model, or None."""
    if device_name is None or bucket(M) is None:
        return None
    e = _index(device_name).get((bits, group, N, K, bucket(M)))
    if e is None:
        return None
    return {k: e[k] for k in TILE + OPTIONAL if k in e}


def check_override() -> int:
    """Read every table ``INFERKIT_KERNEL_CONFIGS`` names (a file, or the JSON files of a folder)
    and return how many configs they hold: a bad table is a clear error before any launch."""
    override = os.environ.get(ENV)
    if not override:
        return 0
    p = Path(override)
    if not p.exists():
        raise ValueError(f"{ENV}={override}: no such file or folder")
    paths = sorted(p.glob("*.json")) if p.is_dir() else [p]
    return sum(len(read_table(path)[1]) for path in paths)


def clear_cache() -> None:
    """Forget loaded tables (after changing ``INFERKIT_KERNEL_CONFIGS`` in a running process)."""
    _index.cache_clear()


def write_table(path: Path, device_name: str, entries: list[dict], **meta) -> Path:
    """Write a table (entries checked first), atomically."""
    entries = [_check(dict(e), str(path)) for e in entries]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    head = json.dumps({"device": device_name, **meta}, indent=1)[:-2]  # one entry per line below
    body = ",\n".join("  " + json.dumps(e) for e in entries)
    tmp.write_text(f'{head},\n "configs": [\n{body}\n ]\n}}\n')
    os.replace(tmp, path)
    return path
