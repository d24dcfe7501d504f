"""Launch the INT4 decode GEMV a few times at the issue's shape, for a profiler to attach to.

    ncu --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        -k regex:gemv --launch-skip 3 --launch-count 1 python benchmarks/gpu_int4_profile.py

(``GPU_PARTS=profile benchmarks/gpu.sh`` runs this.) Shape: 4096 inputs x 14336 outputs, INT4
g128 symmetric, bf16 activations, batch 1; tiles as the runtime picks them (a measured table
for this GPU, else the heuristic), or ``--config JSON``.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help='tiles, e.g. \'{"BN": 128, "SPLIT_K": 8, "num_warps": 8}\'')
    parser.add_argument("--rows", type=int, default=1)
    args = parser.parse_args()
    from inferkit.kernels.quant_matmul import _picked, quant_matmul
    from inferkit.quant.pack import pack_int32

    K, N, group = (4096, 14336, 128) if torch.cuda.is_available() else (256, 64, 128)  # CPU: a check, interpreted
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    w = pack_int32(torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=g), 4, dim=1).to(dev)
    s = (torch.rand(N, K // group, generator=g) * 0.01).to(torch.bfloat16).to(dev)
    x = torch.randn(args.rows, K, generator=g).to(torch.bfloat16).to(dev)
    config = json.loads(args.config) if args.config else None
    # the config launched: the given one, else a measured table's for this GPU, else the heuristic's
    print("config", config or dict(_picked(args.rows, N, K, group, x.device, 4)), flush=True)
    for _ in range(6):
        quant_matmul(x, w, s, None, 4, group, config=config)
    if dev == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
