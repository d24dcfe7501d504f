"""Compile a kernel for a GPU that is not here, and read its machine code.

Triton ships ``ptxas`` and ``nvdisasm``, so a kernel compiles for Hopper (sm_90) on a machine
without a GPU or a CUDA driver. What the compiler made can then be checked in CI: that it
compiles at all (the interpreter accepts code the compiler rejects), its registers and spills,
and the instruction mix of its hot loop (e.g. no quarter-rate int-to-float conversion per weight).

    python -m inferkit.kernels.sass [--json]   # the kernels at the benchmark's shapes

Integer arguments are compiled as the launcher specialises them on a GPU: pointers, sizes and
strides divisible by 16 (as they are for the shapes listed), nothing equal to 1.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton

# Per-SM issue throughput on Hopper (results per clock, CUDA C++ Programming Guide, cc 9.0).
THROUGHPUT = {"FFMA": 128, "FADD": 128, "FMUL": 128, "HFMA2": 128, "HADD2": 128, "HMUL2": 128,
              "I2F": 16, "I2FP": 16, "F2I": 16, "F2F": 16, "F2FP": 16, "SHFL": 32, "LDG": 32, "LDS": 32, "STS": 32}


@dataclass
class Compiled:
    registers: int
    spill_bytes: int
    shared_bytes: int
    loop: collections.Counter = field(default_factory=collections.Counter)  # opcode -> count, hot loop
    all: collections.Counter = field(default_factory=collections.Counter)
    loops: list = field(default_factory=list)  # opcode counters of every loop, in code order
    # the hot loop's 16-byte global loads and asynchronous copies: (position in the loop, opcode),
    # e.g. where ptxas issues a prefetch (at the end of the loop it overlaps little of the work)
    wide_loads: list = field(default_factory=list)
    loop_length: int = 0
    # the hot loop's waits for asynchronous copies: the copy groups each lets stay in flight
    loop_waits: list = field(default_factory=list)

    def per_item(self, items: float) -> float:
        """Instructions per item (e.g. per weight per thread) in the hot loop."""
        return sum(self.loop.values()) / items


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_for(fn, signature: dict, constexprs: dict, *, num_warps: int = 4, num_stages: int = 3,
                divisible: tuple[str, ...] = (), arch: int = 90, maxnreg: int | None = None):
    """The compiled kernel for ``sm_<arch>``; ``signature`` maps argument names to Triton types
    ("*bf16", "i32", ...); ``divisible`` names integer arguments to specialise as multiples of 16."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n].startswith("*") or n in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


# an instruction line of nvdisasm: its opcode (group 1) and modifiers (group 2), after any predicate
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([.\w]*)")


def _opcodes(lines: list[str]) -> collections.Counter:
    return collections.Counter(m.group(1) for line in lines if (m := _INSTRUCTION.search(line)))


def _on_cubin(kernel, tool: str, *args: str) -> str:
    """The output of one of Triton's CUDA tools run on the kernel's cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([_tool(tool), *args, path], capture_output=True, text=True, check=True).stdout


def inspect(kernel) -> Compiled:
    """Registers, spills and the instruction mix of the longest backward-branch loop."""
    usage = _on_cubin(kernel, "cuobjdump", "--dump-resource-usage")
    text = _on_cubin(kernel, "nvdisasm", "-c")
    num = lambda key: int(m.group(1)) if (m := re.search(rf"{key}:(\d+)", usage)) else 0  # noqa: E731
    lines = text.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", line))}
    loop, spans = None, []
    for i, line in enumerate(lines):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        # backward branches; not the branch-to-itself that pads every kernel's end
        if m and labels.get(m.group(1), i) < i - 2:
            spans.append((labels[m.group(1)], i))
            if loop is None or i - labels[m.group(1)] > loop[1] - loop[0]:  # the longest: the hot loop
                loop = spans[-1]
    body = lines[loop[0]:loop[1] + 1] if loop else []
    instructions = [line for line in body if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
    wide = [(i, m.group(1)) for i, line in enumerate(instructions)
            if (m := re.search(r"\s(LDG(?:STS)?\.E\S*\.128)\s", line))]
    waits = [int(m.group(1), 16) for line in instructions if (m := re.search(r"DEPBAR\.LE SB0, (0x[0-9a-f]+)", line))]
    return Compiled(num("REG"), num("STACK") + num("LOCAL"), num("SHARED"), _opcodes(body), _opcodes(lines),
                    [_opcodes(lines[a:b + 1]) for a, b in spans], wide, len(instructions), waits)


def before_wait(kernel) -> tuple[list[str], bool]:
    """The opcodes a PDL kernel (``PDL``) runs before ``griddepcontrol.wait`` (SASS ``ACQBULK``),
    in code order, and whether the kernel waits at all: what may overlap the kernel before it."""
    ops = [m.group(1) + m.group(2) for line in _on_cubin(kernel, "nvdisasm", "-c").splitlines()
           if (m := _INSTRUCTION.search(line))]
    return (ops[:ops.index("ACQBULK")], True) if "ACQBULK" in ops else (ops, False)


GEMV_SIG = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
            "ws_ptr": "*fp32", "cnt_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32", "KW": "i32", "G": "i32",
            "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_zn": "i32", "stride_om": "i32"}
GEMV_DIVISIBLE = ("N", "K", "KW", "stride_xm", "stride_wn", "stride_sn", "stride_zn", "stride_om")


def quant_matmul_kernel(M: int, bits: int = 4, group: int = 128, BN: int = 128, BK: int = 128, split: int = 1,
                        num_warps: int = 4, zero_points: bool = False, mma_ieee: bool = False, one_dot: bool = True,
                        vec_x: bool = True, even_k: bool = True, prefetch: int = 1, stages: int = 0,
                        swap: bool = False, pdl: bool = False):
    """The dequantizing matmul as ``quant_matmul`` launches it for M rows (bf16 activations);
    ``stages``: the GEMV's STAGES, or the MMA or swap kernel's (0: its default, 2 or 1); ``swap``:
    the swap kernel (``KERNEL: swap``), with ``one_dot`` its ONE_DOT; ``pdl``: launched as a
    programmatic dependent launch (``PDL``)."""
    from inferkit.kernels.quant_matmul import (_gemv_kernel, _mma_kernel, _swap_kernel, field_lop3, gemv_options,
                                               mma_one_dot, swap_one_dot, swap_tile_k)

    consts = dict(BITS=bits, GROUP=group, HAS_ZP=zero_points, PER_CHANNEL=False, HAS_BIAS=False, BN=BN, BK=BK,
                  SPLIT_K=split, PDL=pdl)
    if swap:
        consts["BK"] = swap_tile_k(BK, group, False)
        return compile_for(_swap_kernel, GEMV_SIG, {**consts, "BM": 16 if M <= 16 else 32 if M <= 32 else 64,
                                                    "ONE_DOT": swap_one_dot(one_dot, consts["BK"]), "EVEN_K": even_k,
                                                    "ASM": True},
                           num_warps=num_warps, num_stages=stages or 1, divisible=GEMV_DIVISIBLE)
    if M <= 4:
        options = gemv_options(M, bits, BN, BK, num_warps, zero_points, False, group, even_k, ptx=True,
                               prefetch=prefetch, stages=stages)
        cap = options.pop("maxnreg", None)
        return compile_for(_gemv_kernel, GEMV_SIG, {**consts, "BM": triton.next_power_of_2(M), "VEC_X": vec_x, **options},
                           num_warps=num_warps, divisible=GEMV_DIVISIBLE, maxnreg=cap)
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    one_dot = mma_one_dot(one_dot, bm, BN, BK, num_warps, False, group)  # as quant_matmul launches it
    return compile_for(_mma_kernel, GEMV_SIG, {**consts, "BM": bm, "IEEE": mma_ieee, "ONE_DOT": one_dot,
                                               "LOP3": field_lop3("mma", zero_points, None, ptx=True)},
                       num_warps=num_warps, num_stages=stages or 2, divisible=GEMV_DIVISIBLE)


ATTN_SIG = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "tables_ptr": "*i32", "lens_ptr": "*i32",
            "out_ptr": "*bf16", "part_ptr": "*fp32", "ml_ptr": "*fp32", "scale": "fp32", "tokens_per_split": "i32",
            **{f"stride_{n}": "i32" for n in ("qb", "qh", "kblock", "kslot", "khead", "tb", "ob", "oh", "pb", "ph", "ps",
                                              "mb", "mh", "ms")}}


def paged_attention_kernels(dtype: str = "bf16", group: int = 4, head_dim: int = 128, block_size: int = 16,
                            block_n: int | None = None, signal: bool = True):
    """The decode split kernel and the merge kernel as ``paged_decode_attention`` launches them
    (on sm_90 both signal a PDL matmul after them: ``signal``)."""
    from inferkit.kernels.paged_attention import _decode_split_kernel, _merge_kernel

    block_n = block_n or (32 if dtype == "fp32" and head_dim > 64 else 64)  # as the launcher picks
    sig = {k: (f"*{dtype}" if v == "*bf16" else v) for k, v in ATTN_SIG.items()}
    strides = tuple(k for k in sig if k.startswith("stride_") or k == "tokens_per_split")
    split = compile_for(_decode_split_kernel, sig, dict(
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, BLOCK_N=block_n, MULTI=True,
        IEEE=dtype == "fp32", SIGNAL=signal), num_stages=2, divisible=strides)
    msig = {"part_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": f"*{dtype}", "num_splits": "i32",
            **{f"stride_{n}": "i32" for n in ("pb", "ph", "ps", "mb", "mh", "ms", "ob", "oh")}}
    merge = compile_for(_merge_kernel, msig, dict(S_PAD=16, HEAD_DIM=head_dim,
                                                  D_PAD=max(16, triton.next_power_of_2(head_dim)), SIGNAL=signal))
    return split, merge


PREFILL_SIG = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "tables_ptr": "*i32",
               "info_ptr": "*i32", "scale": "fp32",
               **{f"stride_{n}": "i32" for n in ("qt", "qh", "kblock", "kslot", "khead", "tb", "ot", "oh")}}


def paged_prefill_kernel(dtype: str = "bf16", group: int = 4, head_dim: int = 128, block_size: int = 16,
                         signal: bool = True):
    """The prefill kernel as ``paged_prefill_attention`` launches it on a GPU."""
    import torch

    from inferkit.kernels.paged_attention import _prefill_kernel, prefill_tiles

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    group_pad = 1 << (group - 1).bit_length()
    block_m, block_n = prefill_tiles(group, head_dim, torch_dtype, interpret=False)
    sig = {k: (f"*{dtype}" if v == "*bf16" else v) for k, v in PREFILL_SIG.items()}
    return compile_for(_prefill_kernel, sig, dict(
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, IEEE=dtype == "fp32", SIGNAL=signal),
        num_stages=2, divisible=tuple(k for k in sig if k.startswith("stride_")))


def fused_kernels(dtype: str = "bf16", hidden: int = 4096, heads: tuple[int, int] = (32, 8), head_dim: int = 128,
                  inter: int = 14336, signal: bool = True) -> list[tuple[str, object]]:
    """The layer's element-wise kernels as ``inferkit.kernels.fused`` launches them (on sm_90 the
    RMSNorm and SiLU kernels signal the PDL matmul after them: ``signal``)."""
    import torch

    from inferkit.kernels.fused import _consts, _rms_norm_kernel, _rope_store_kernel, _silu_mul_kernel

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    p = f"*{dtype}"
    norm_c = _consts("norm", torch_dtype, hidden)
    rope_c = _consts("rope", torch_dtype, heads[0], heads[1], head_dim)
    silu_c = _consts("silu", torch_dtype, inter)
    sigs = [
        ("rms_norm", _rms_norm_kernel, norm_c, {"h_ptr": p, "u_ptr": p, "w_ptr": p, "out_ptr": p, "H": "i32",
                                                 "stride_h": "i32", "stride_u": "i32", "stride_o": "i32", "eps": "fp32"},
         {"HAS_UPDATE": True, "SIGNAL": signal}),
        ("rope_store", _rope_store_kernel, rope_c, {"qkv_ptr": p, "cos_ptr": p, "sin_ptr": p, "pos_ptr": "*i64",
                                                     "slots_ptr": "*i64", "q_ptr": p, "kc_ptr": p, "vc_ptr": p,
                                                     **{f"stride_{n}": "i32" for n in ("t", "cos", "sin", "qt", "cslot")}},
         {}),
        ("silu_mul", _silu_mul_kernel, silu_c, {"x_ptr": p, "out_ptr": p, "I": "i32", "stride_x": "i32", "stride_o": "i32"},
         {"SIGNAL": signal}),
    ]
    out = []
    for name, fn, consts, sig, extra in sigs:
        constexprs = {k: v for k, v in consts.items() if k not in ("num_warps", "enable_fp_fusion")}
        out.append((name, compile_for(fn, sig, {**constexprs, **extra}, num_warps=consts["num_warps"],
                                      divisible=tuple(k for k in sig if k.startswith("stride") or k in ("H", "I")))))
    return out


def report() -> list[dict]:
    """Every kernel as the launchers compile it for an H100: the benchmark's matmul shapes at
    1/8/32 rows (tiles as ``pick_config`` picks them), decode GEMVs with zero points and small
    groups, a float32 MMA, and paged decode and prefill attention in each dtype (prefill also at
    the demo model's heads)."""
    import torch

    from inferkit.kernels import quant_matmul as qm

    cuda = torch.device("cuda")
    qm._SM_COUNT.setdefault(cuda, 132)  # an H100 SXM, for the heuristic's split-K
    cases = [dict(K=K, N=N, M=M, group=128, zp=False) for K, N in ((4096, 4096), (4096, 14336), (14336, 4096))
             for M in (1, 8, 32)]
    cases += [dict(K=1536, N=576, M=1, group=64, zp=True), dict(K=4096, N=14336, M=1, group=128, zp=True),
              dict(K=4096, N=4096, M=3, group=32, zp=True),
              dict(K=4096, N=4096, M=4, group=128, zp=False), dict(K=4096, N=4096, M=20, group=128, zp=False, ieee=True),
              dict(K=4096, N=14336, M=8, group=128, zp=False, one_dot=False),
              dict(K=4096, N=14336, M=1, group=128, zp=False, vec_x=False),
              dict(K=4096, N=14336, M=1, group=128, zp=False, prefetch=2),
              dict(K=4096, N=14336, M=1, group=128, zp=False, stages=4),
              dict(K=1536, N=576, M=1, group=64, zp=True, stages=3), dict(K=4096, N=14336, M=16, group=128, zp=False),
              dict(K=4096, N=14336, M=16, group=128, zp=False, stages=4)]
    # the swap kernel (opt-in: KERNEL "swap"), at the tiles the GPU sweep tries first
    swap_tile = dict(BN=128, BK=128, SPLIT_K=4, num_warps=4)
    cases += [dict(K=4096, N=14336, M=1, group=128, zp=False, swap=swap_tile),
              dict(K=4096, N=14336, M=1, group=128, zp=False, swap=dict(swap_tile, BN=256, num_warps=8)),
              dict(K=4096, N=14336, M=1, group=128, zp=False, swap=swap_tile, one_dot=False),
              dict(K=4096, N=14336, M=16, group=128, zp=False, swap=swap_tile),
              dict(K=4096, N=14336, M=32, group=128, zp=False, swap=dict(swap_tile, SPLIT_K=1)),
              dict(K=1536, N=576, M=1, group=64, zp=True, swap=dict(swap_tile, BN=64, BK=64))]
    rows = []
    for case in cases:
        if "swap" in case:
            case = dict(case)
            cfg, kind = case.pop("swap"), "swap"
        else:
            # 3-4 rows: the GEMV as a measured table or the tuner may launch it there (the heuristic
            # takes the MMA kernel), with the heuristic's GEMV tiles for several rows
            cfg = qm.pick_config(case["M"] if case["M"] > 4 else min(case["M"], 2), case["N"], case["K"], case["group"],
                                 cuda)
            kind = "gemv" if case["M"] <= 4 else "mma"
        c = inspect(quant_matmul_kernel(case["M"], group=case["group"], BN=cfg["BN"], BK=cfg["BK"], split=cfg["SPLIT_K"],
                                        num_warps=cfg["num_warps"], zero_points=case["zp"],
                                        mma_ieee=case.get("ieee", False), one_dot=case.get("one_dot", True),
                                        vec_x=case.get("vec_x", True), prefetch=case.get("prefetch", 1),
                                        stages=case.get("stages", 0), swap=kind == "swap"))
        weights = cfg["BN"] * cfg["BK"] / (32 * cfg["num_warps"])  # per thread per loop iteration
        rows.append({"kernel": kind, **case, "config": cfg, "registers": c.registers, "spill_bytes": c.spill_bytes,
                     "loop": dict(c.loop), "all": dict(c.all), "weights_per_thread": weights,
                     "loop_per_weight": c.per_item(weights), "loop_length": c.loop_length,
                     "wide_loads": c.wide_loads, "loop_waits": c.loop_waits})
    for dtype in ("bf16", "fp16", "fp32"):
        split, merge = paged_attention_kernels(dtype)
        kernels = [("attention-split", "32/8 heads, dim 128", split), ("attention-merge", "32/8 heads, dim 128", merge),
                   ("attention-prefill", "32/8 heads, dim 128", paged_prefill_kernel(dtype)),
                   ("attention-prefill", "9/3 heads, dim 64", paged_prefill_kernel(dtype, group=3, head_dim=64))]
        for name, heads, kernel in kernels:
            c = inspect(kernel)
            rows.append({"kernel": name, "dtype": dtype, "heads": heads, "registers": c.registers,
                         "spill_bytes": c.spill_bytes, "loop": dict(c.loop), "all": dict(c.all),
                         "loops": [dict(x) for x in c.loops]})
    for dtype in ("bf16", "fp32"):
        for shape, kw in (("Llama-3-8B", {}), ("SmolLM2-135M", dict(hidden=576, heads=(9, 3), head_dim=64, inter=1536)),
                          ("Llama-3-70B", dict(hidden=8192, heads=(64, 8), inter=28672))):
            for name, kernel in fused_kernels(dtype, **kw):
                c = inspect(kernel)
                rows.append({"kernel": name, "dtype": dtype, "heads": shape, "registers": c.registers,
                             "spill_bytes": c.spill_bytes, "loop": dict(c.loop), "all": dict(c.all)})
    return rows


def main() -> None:
    import argparse
    import json

    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    rows = report()
    if parser.parse_args().json:
        print(json.dumps(rows))
        return
    table = Table(title="Kernels compiled for sm_90 (bf16 activations unless noted), tiles as quant_matmul picks "
                        "them for an H100; hot loop per thread; 16-byte loads by position in the loop "
                        "(a: asynchronous copies; waits: copy groups left in flight)")
    for col in ("kernel", "shape", "tile", "regs", "spill B", "loop instr", "per weight", "I2F", "top opcodes",
                "16-byte loads at"):
        table.add_column(col)
    for r in rows:
        loop = collections.Counter(r["loop"])
        top = " ".join(f"{op}:{n}" for op, n in loop.most_common(6))
        if r["kernel"] in ("gemv", "mma", "swap"):
            cfg = r["config"]
            name = f"{r['kernel']} M{r['M']}" + (" zp" if r["zp"] else "") + (" fp32" if r.get("ieee") else "") \
                + (" dot/value" if r.get("one_dot") is False else "") + (" strided x" if r.get("vec_x") is False else "") \
                + (f" {r['prefetch']} ahead" if r.get("prefetch", 1) > 1 else "") \
                + (f" {r['stages']} stages" if r.get("stages") else "")
            table.add_row(name, f"{r['K']}x{r['N']} g{r['group']}",
                          f"{cfg['BN']}x{cfg['BK']} w{cfg['num_warps']} split {cfg['SPLIT_K']}", str(r["registers"]),
                          str(r["spill_bytes"]), str(sum(loop.values())), f"{r['loop_per_weight']:.2f}",
                          str(loop["I2F"] + loop["I2FP"]), top,
                          ",".join(str(i) + ("a" if op.startswith("LDGSTS") else "") for i, op in r["wide_loads"])
                          + (f"; waits {','.join(map(str, r['loop_waits']))}" if r["loop_waits"] else ""))
        else:
            table.add_row(f"{r['kernel']} {r['dtype']}", r["heads"], "", str(r["registers"]),
                          str(r["spill_bytes"]), str(sum(loop.values())), "", "", top, "")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
