"""``inferkit tune-kernels``: measure the dequantizing matmul's tiles for one model's layers on
this GPU and write a table that the runtime then launches with (``INFERKIT_KERNEL_CONFIGS``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from inferkit.errors import InferkitError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pick_device(device: str | None) -> torch.device:
    """CUDA when there is one; the CPU only under ``TRITON_INTERPRET=1`` (a functional check)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device is None:
        device = "cuda" if torch.cuda.is_available() and not interpret else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InferkitError("tune-kernels: no CUDA device is visible (torch.cuda.is_available() is False)")
    if dev.type == "cpu" and not interpret:
        raise InferkitError("tune-kernels times the Triton kernels on a CUDA GPU and none is visible; "
                            "TRITON_INTERPRET=1 runs it on the CPU as a functional check (its times mean nothing)")
    if dev.type not in ("cuda", "cpu"):
        raise InferkitError(f"tune-kernels: device must be cuda or cpu, got {device!r}")
    return dev


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"


def load_problems(model: str | Path, device: torch.device, dtype: str):
    """The runtime model's distinct quantized matmuls (loaded as the runtime loads it, with the
    Triton linear backend, so q/k/v and gate/up are fused exactly when serving fuses them)."""
    from inferkit.kernels.tune import model_problems
    from inferkit.runtime import LLM

    llm = LLM(model, device=str(device), dtype=dtype, linear_backend="triton", attention_backend="torch",
              cuda_graphs=False, max_model_len=16, num_kv_blocks=1, block_size=16, max_num_seqs=1)
    problems = model_problems(llm.engine.model)
    if not problems:
        raise InferkitError(f"{model}: no INT4/INT8 layers the Triton matmul serves (an unquantized model, or "
                            "formats it does not take: group sizes must be powers of two dividing the inputs)")
    return problems


def tune(model: str | Path, rows: list[int], dtype: str = "bfloat16", device: str | None = None,
         grid: str = "full", pdl: bool = False, progress=lambda done, total, label: None) -> dict:
    """Sweep every (shape, row count) of the model; returns the table's entries and the sweep.
    ``pdl``: also time the fastest plain configs as programmatic dependent launches (sm_90+)."""
    from inferkit.kernels import pdl as gdc
    from inferkit.kernels import tuned
    from inferkit.kernels.tune import GRIDS, PDL_TOP, best_entry, candidates, operand_copies, pdl_variants, sweep

    if grid not in GRIDS:
        raise InferkitError(f"--grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    if dtype not in DTYPES:
        raise InferkitError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    bad = [m for m in rows if tuned.bucket(m) is None or m < 1]
    if not rows or bad:
        raise InferkitError(f"--rows must be 1-64 (above 64 rows the heuristic decides), got {bad or rows}")
    dev = pick_device(device)
    if pdl and dev.type == "cuda" and not gdc.capable(dev):
        raise InferkitError(f"--pdl: programmatic dependent launches need an sm_90 or later NVIDIA GPU; "
                            f"{device_name(dev)} is sm_{''.join(map(str, torch.cuda.get_device_capability(dev)))}")
    problems = load_problems(model, dev, dtype)
    configs = {(p.key, m): candidates(m, p.N, p.K, p.group, p.bits, dev, grid) for p in problems for m in rows}
    total, done = sum(len(c) + (PDL_TOP if pdl else 0) for c in configs.values()), 0
    entries, results = [], []
    for p in problems:
        weight, copies = p.dequantized(), operand_copies(p, dev)
        for m in rows:
            progress(done, total, f"{p.label()} x {m} rows")
            swept = sweep(p, m, DTYPES[dtype], configs[p.key, m], copies, weight)
            if pdl:
                swept += sweep(p, m, DTYPES[dtype], pdl_variants(swept), copies, weight)
            done += len(configs[p.key, m]) + (PDL_TOP if pdl else 0)
            entry = best_entry(p, m, swept)
            if entry is not None:
                entries.append(entry)
            results.append({"shape": p.label(), "N": p.N, "K": p.K, "bits": p.bits, "group": p.group, "M": m,
                            "layers": p.layers, "best": entry, "configs": swept})
        del weight, copies
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    progress(total, total, "done")
    import triton

    return {"device": device_name(dev), "interpreted": dev.type != "cuda", "dtype": dtype, "grid": grid,
            "pdl": pdl, "rows": rows, "triton": triton.__version__, "torch": torch.__version__, "entries": entries,
            "results": results}


def write(out: Path, result: dict, model: str, overwrite: bool, update: bool) -> list[dict]:
    """Write the table atomically; ``update`` keeps an existing table's other entries."""
    from inferkit.kernels import tuned
    from inferkit.kernels.tune import merge

    entries = result["entries"]
    if out.exists():
        if update:
            try:
                old_device, old = tuned.read_table(out)
            except ValueError as exc:
                raise InferkitError(str(exc)) from None
            if old_device != result["device"]:
                raise InferkitError(f"{out} is a table for {old_device!r}, not this GPU ({result['device']!r}): "
                                    "write a new one")
            entries = merge(old, entries)
        elif not overwrite:
            raise InferkitError(f"{out} exists: pass --overwrite to replace it or --update to add to it")
    if not entries:
        raise InferkitError("no config ran correctly on this device: nothing to write")
    tuned.write_table(out, result["device"], entries, triton=result["triton"], torch=result["torch"],
                      dtype=result["dtype"], interpreted=result["interpreted"],
                      source=f"inferkit tune-kernels {Path(str(model)).name} --grid {result['grid']} "
                      + ("--pdl " if result.get("pdl") else "")
                      + ("(Triton interpreter: wall time of one call)" if result["interpreted"] else "(graph-replayed)"))
    return entries
