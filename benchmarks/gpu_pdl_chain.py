"""A decode step's MLP block at batch 1, timed as the runtime launches it: does a programmatic
dependent launch (PDL) of the INT4 matmuls pay after the kernels that really precede them?

``gpu_int4_sweep.py --grid next`` times each matmul config back to back, so a PDL launch there
overlaps its first tiles with the tail of the same matmul. In a decoder the matmul follows an
RMSNorm or the SiLU-and-multiply kernel (both signal their dependents at their start). This
times, graph-replayed with the weights cycled past L2 (``kernels.tune.time_call``), on
Llama-3-8B's shapes (hidden 4096, intermediate 14336, INT4 g128 symmetric, bf16):

- ``up``: the issue's 4096x14336 matmul alone, back to back (as the sweep times it);
- ``norm+up``: RMSNorm, then that matmul;
- ``mlp``: RMSNorm (adding the residual), the joined gate/up matmul (4096x28672), SiLU-and-multiply,
  the down matmul (14336x4096), as ``inferkit.runtime`` runs a layer's MLP;

each with bf16 ``torch.matmul``, INT4 plain launches, INT4 PDL launches (tiles: the GPU's
table, else the heuristic) and INT4 as ``quant_matmul`` launches it by default (the table's
``PDL`` too). The log's last lines give the INT4 speedups over bf16.

    python benchmarks/gpu_pdl_chain.py --out bench_out/pdl_chain.json

(``GPU_PARTS=chain benchmarks/gpu.sh`` runs this.) On the CPU it checks itself on a 256/512
model under the Triton interpreter: every INT4 chain gives the reference's numbers, PDL or not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def int4_weight(N: int, K: int, group: int, seed: int, dev: torch.device) -> tuple:
    """Random INT4 codes packed as the artifact packs them, scales, and the bf16 weight they stand for."""
    from inferkit.quant.pack import pack_int32

    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
    s = (torch.rand(N, K // group, generator=g) * 0.01 + 0.001).to(torch.bfloat16)
    dense = (q.float() * s.float().repeat_interleave(group, 1)).to(torch.bfloat16)
    return pack_int32(q, 4, dim=1).to(dev), s.to(dev), dense.to(dev)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out/pdl_chain.json"))
    args = parser.parse_args()
    from inferkit.kernels import tune
    from inferkit.kernels.fused import rms_norm, silu_mul
    from inferkit.kernels.quant_matmul import quant_matmul

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    H, inter, group = (4096, 14336, 128) if cuda else (256, 512, 128)
    *up, up_dense = int4_weight(inter, H, group, 1, dev)
    *gate_up, gate_up_dense = int4_weight(2 * inter, H, group, 2, dev)
    *down, down_dense = int4_weight(H, inter, group, 3, dev)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, H, generator=g).to(torch.bfloat16).to(dev)
    residual = torch.randn(1, H, generator=g).to(torch.bfloat16).to(dev)
    norm_w = (1 + 0.1 * torch.randn(H, generator=g)).to(torch.bfloat16).to(dev)

    def copies(parts: tuple, nbytes: int) -> list:  # as many copies as time_call cycles through for nbytes
        return [parts] + [tuple(t.clone() for t in parts) for _ in range(tune._l2_copies(nbytes) - 1)] if cuda \
            else [parts]

    # the weights each chain reads (bytes decide the copies; g128 scales add 1/32 to the codes' bytes)
    up_bytes, mlp_bytes = (inter * H, 3 * inter * H)
    weights = {
        "bf16": (copies((up_dense,), 2 * up_bytes), copies((gate_up_dense, down_dense), 2 * mlp_bytes)),
        "int4": (copies(up, up_bytes // 2), copies(gate_up + down, mlp_bytes // 2)),
    }

    def chain(name: str, int4: bool, pdl: bool | None):
        """make_call(i) for time_call: the chain on the i-th copy of its weights; ``pdl`` None: as
        quant_matmul launches by default (a table entry's ``PDL``, else plain)."""
        ups, mlps = weights["int4" if int4 else "bf16"]
        if int4:
            mm = lambda x, w, s: quant_matmul(x, w, s, None, 4, group, pdl=pdl)  # noqa: E731
        else:
            mm = lambda x, w: torch.matmul(x, w.T)  # noqa: E731
        if name == "up":
            return lambda i: lambda: mm(h, *ups[i % len(ups)])
        if name == "norm+up":
            return lambda i: lambda: mm(rms_norm(h, norm_w, 1e-5), *ups[i % len(ups)])

        def mlp(w):
            gu, dn = (w[:2], w[2:]) if int4 else (w[:1], w[1:])
            # the residual added in place, as the runtime's norm does: a copy of h keeps the inputs fixed
            return mm(silu_mul(mm(rms_norm(h.clone(), norm_w, 1e-5, residual), *gu)), *dn)
        return lambda i: lambda: mlp(mlps[i % len(mlps)])

    # the INT4 chains' numbers first: the same bits PDL or not (or as the table says), and near
    # the bf16 chain on the weights they stand for
    for name in ("up", "norm+up", "mlp"):
        want = chain(name, False, False)(0)().float()
        plain, pdl, default = (chain(name, True, p)(0)().float() for p in (False, True, None))
        assert torch.equal(plain, pdl) and torch.equal(plain, default), f"{name}: PDL changed the numbers"
        err = ((plain - want).norm() / want.norm()).item()
        assert err < 2e-2, f"{name}: INT4 chain off the bf16 chain by {err:.3g}"
        print(f"{name}: INT4 = INT4 as PDL, {err:.2e} off bf16", flush=True)

    results = {"device": torch.cuda.get_device_name() if cuda else "cpu (check)", "hidden": H, "intermediate": inter,
               "group": group, "chains": {}}
    for name, nbytes in (("up", up_bytes), ("norm+up", up_bytes), ("mlp", mlp_bytes)):
        row = {}
        for label, int4, pdl, b in (("bf16", False, False, 2 * nbytes), ("int4", True, False, nbytes // 2),
                                    ("int4_pdl", True, True, nbytes // 2), ("int4_default", True, None, nbytes // 2)):
            us = tune.time_call(chain(name, int4, pdl), b, dev) * 1e6
            row[f"{label}_us"] = round(us, 2)
            print(f"{name} {label}: {us:.2f} us", flush=True)
        row["int4_speedup"] = round(row["bf16_us"] / row["int4_us"], 3)
        row["int4_pdl_speedup"] = round(row["bf16_us"] / row["int4_pdl_us"], 3)
        row["int4_default_speedup"] = round(row["bf16_us"] / row["int4_default_us"], 3)
        results["chains"][name] = row
        print(f"{name}: INT4 {row['int4_speedup']:.2f}x bf16 plain, {row['int4_pdl_speedup']:.2f}x as PDL launches "
              f"(PDL {row['int4_pdl_us'] - row['int4_us']:+.2f} us); as quant_matmul launches it by default (the "
              f"GPU's table, else the heuristic) {row['int4_default_speedup']:.2f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
