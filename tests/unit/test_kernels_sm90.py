"""The kernels compiled for Hopper (sm_90) without a GPU, with the ptxas that Triton ships
(``python -m inferkit.kernels.sass``, in a subprocess: this suite imports the kernels in
interpreter mode). The interpreter runs code the compiler would reject, so this catches what
only a GPU run would; it also pins what makes the decode GEMV fast: no spills, no int-to-float
conversion and no barrier in its loop, about five instructions per weight."""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
    pytest.skip("Triton's ptxas is not installed", allow_module_level=True)


def compile_env() -> dict:
    """This environment for a compiling subprocess: no interpreter, no multiply-add contraction."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # the kernels must not depend on contraction
    return env


def run_compiles(script: str, cases: list) -> list[str]:
    """Run ``script`` (Python that compiles kernels, ``sys.argv[1]`` the JSON of ``cases``) in a
    compiling subprocess; its output lines."""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True, text=True,
                          env=compile_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.splitlines()


def compile_quant_matmuls(calls: list[dict]) -> int:
    """Compile ``sass.quant_matmul_kernel(**kw)`` for each of ``calls`` in a compiling subprocess;
    how many compiled (it stops at the first that fails)."""
    script = ("import json, sys\nfrom inferkit.kernels.sass import quant_matmul_kernel\n"
              "for kw in json.loads(sys.argv[1]):\n"
              "    quant_matmul_kernel(**kw)\n"
              "    print('compiled', flush=True)\n")
    return sum(line == "compiled" for line in run_compiles(script, calls))


@pytest.fixture(scope="module")
def report():
    proc = subprocess.run([sys.executable, "-m", "inferkit.kernels.sass", "--json"], capture_output=True, text=True,
                          env=compile_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_decode_gemv_compiles_lean(report):
    gemvs = [r for r in report if r["kernel"] == "gemv"]
    assert len(gemvs) == 11
    for r in gemvs:
        loop = r["loop"]
        assert r["spill_bytes"] == 0, r
        assert loop.get("I2F", 0) + loop.get("I2FP", 0) == 0  # fields become floats by the mantissa trick
        assert loop.get("FFMA", 0) >= r["weights_per_thread"]  # >= one multiply-add per weight: the real loop
        rows = triton.next_power_of_2(r["M"])
        # 1 LOP3 + 1 multiply-add per value, 1 FMA per row; loads, scales, inputs on top, shared by
        # the rows a thread takes. One activation row, 2 rows per thread (the heuristic's since the
        # H100 sweeps), products summed per thread until the end: 4.55 (g128, capped at 64
        # registers) to 5.5 (g128 with zero points, capped: two instructions per value there)
        # with Triton 3.9 and 3.6. Two instructions per value everywhere: 5.05 to 5.7. Summed
        # across threads every tile (a barrier per tile): 5.6 to 5.9. The first kernel: 5.6, of
        # which 1.0 quarter-rate int-to-float conversions
        assert r["loop_per_weight"] / rows < (6.0 if rows == 1 else 4.5), r
        if rows == 1 and not r["zp"] and r.get("vec_x", True):  # one lop3 per value (_field); the pipelined
            assert r["loop_per_weight"] < (5.1 if r.get("stages") else 4.8), r  # loop's copies and waits on top
        if not r["zp"] and not r.get("stages"):  # no reduction across threads, no layout change in the loop
            assert loop.get("BAR", 0) == 0 and loop.get("SHFL", 0) == 0, r
        # the cap keeps 4 programs of 8 warps per SM (3 with zero points)
        if r["M"] == 1 and r["config"]["num_warps"] == 8 and r.get("prefetch", 1) == 1 and not r.get("stages"):
            assert r["registers"] <= (80 if r["zp"] else 64), r
    ahead = [r for r in gemvs if r.get("prefetch", 1) == 2]
    # 2 tiles ahead, uncapped: twice the words in flight per thread, 3 programs of 8 warps per SM
    assert len(ahead) == 1 and ahead[0]["registers"] <= 80 and ahead[0]["config"]["num_warps"] == 8, ahead
    # the pipelined loop: words, inputs and scales copied asynchronously into shared memory
    # (LDGSTS), read back (LDS), the stage's wait and 2 barriers per tile (5 with Triton 3.6, the
    # GPU image's, in the demo's g64 tile with zero points); in 64 (Triton 3.6) to 72 (3.9)
    # registers at 4 stages, so 3-4 programs of 8 warps per SM
    piped = [r for r in gemvs if r.get("stages")]
    assert len(piped) == 2, piped
    for r in piped:
        loop = r["loop"]
        assert loop.get("LDGSTS", 0) >= 3 and loop.get("LDS", 0) >= 3 and loop.get("BAR", 0) <= (5 if r["zp"] else 2), r
        assert r["loop_waits"] and min(r["loop_waits"]) > 0, r  # copies stay in flight during a tile's work
        assert r["registers"] <= (80 if r["zp"] else 72), r


def test_mma_kernels_compile_with_tensor_cores_and_no_spills_in_the_loop(report):
    mmas = [r for r in report if r["kernel"] == "mma"]
    assert len(mmas) == 10
    for r in mmas:
        loop = r["loop"]
        assert loop.get("LDL", 0) + loop.get("STL", 0) == 0, r
        assert loop.get("I2F", 0) + loop.get("I2FP", 0) == 0
        assert loop.get("HMMA", 0) > 0 if not r.get("ieee") else loop.get("FFMA", 0) > 0
    # 4 stages (a config's STAGES): the loop waits for the oldest tile's copies only, the next
    # tiles' stay in flight during its work (at the default 2 stages the wait is for all)
    deep = [r for r in mmas if r.get("stages") == 4]
    assert len(deep) == 1 and deep[0]["loop_waits"] and min(deep[0]["loop_waits"]) > 0, deep


def test_swap_kernel_dequantizes_two_weights_per_instruction_for_the_tensor_cores(report):
    """The swap kernel (KERNEL swap): wgmma with the weights as the first operand, each pair of
    weights made two 16-bit floats by one lop3 and one packed add (HADD2), each pair of words
    made by one prmt, no int-to-float conversion, no spills. At 1-16 rows and g128 the joined
    tile takes 2.6-2.8 instructions per weight here (no FP contraction; 2.5-2.7 with it, as
    launched; Triton 3.6 and 3.9; BN 256 / 8 warps the fewer), where the GEMV at one row takes
    4.55: about 40% fewer in the loop that bounds decode."""
    swaps = [r for r in report if r["kernel"] == "swap"]
    assert len(swaps) == 6
    gemv = next(r for r in report if r["kernel"] == "gemv" and r["M"] == 1 and (r["K"], r["N"]) == (4096, 14336)
                and not r["zp"] and r.get("vec_x", True) and r.get("prefetch", 1) == 1 and not r.get("stages"))
    for r in swaps:
        loop = r["loop"]
        assert r["spill_bytes"] == 0, r
        assert loop.get("HGMMA", 0) + loop.get("HMMA", 0) > 0, r
        assert loop.get("I2F", 0) + loop.get("I2FP", 0) + loop.get("F2FP", 0) == 0, r
        assert loop.get("HADD2", 0) + loop.get("HFMA2", 0) >= r["weights_per_thread"] / 2, r  # one per two weights
        assert loop.get("PRMT", 0) >= r["weights_per_thread"] / 8, r  # one per pair of words, each way
        assert r["loop_per_weight"] < 5.5, r  # the demo's g64 tile with zero points, 64 x 64: 4.2-4.5
        if r["group"] == 128 and r.get("one_dot", True) and r["M"] <= 16:
            assert r["loop_per_weight"] < 2.9 and r["loop_per_weight"] < gemv["loop_per_weight"] - 1.6, (r, gemv)


def test_paged_attention_compiles_without_spills(report):
    attention = [r for r in report if r["kernel"].startswith("attention")]
    assert sorted((r["kernel"], r["dtype"]) for r in attention) == sorted(
        [(k, d) for k in ("attention-split", "attention-merge") for d in ("bf16", "fp16", "fp32")]
        + [("attention-prefill", d) for d in ("bf16", "fp16", "fp32") for _ in range(2)])
    for r in attention:
        assert r["spill_bytes"] == 0, r
        # each lets a PDL matmul after it start (launch_dependents, once), and waits for nothing
        assert r["all"].get("PREEXIT", 0) == 1 and r["all"].get("ACQBULK", 0) == 0, r
    assert all(r["all"].get("HMMA", 0) > 0 for r in attention if r["kernel"] == "attention-split" and r["dtype"] != "fp32")
    # prefill tiles of 64 (token, head) rows: warpgroup MMAs in 16-bit dtypes, exact float32 on the CUDA cores
    for r in attention:
        if r["kernel"] == "attention-prefill":
            assert (r["all"].get("HGMMA", 0) > 0) == (r["dtype"] != "fp32"), r
            assert r["dtype"] != "fp32" or r["loop"].get("FFMA", 0) > 0
            if r["dtype"] != "fp32":  # K/V tiles below the diagonal run a loop without masks
                sizes = sorted((sum(x.values()), x.get("FSEL", 0)) for x in r["loops"] if x.get("HGMMA", 0))
                assert len(sizes) == 2 and sizes[0][1] <= 4 and sizes[1][1] >= 32, sizes
                assert sizes[0][0] < 0.8 * sizes[1][0], sizes  # 608 vs 848 for 32/8 heads of 128


def test_fused_elementwise_kernels_compile_without_spills(report):
    fused = [r for r in report if r["kernel"] in ("rms_norm", "rope_store", "silu_mul")]
    assert sorted((r["kernel"], r["dtype"], r["heads"]) for r in fused) == sorted(
        (k, d, s) for k in ("rms_norm", "rope_store", "silu_mul") for d in ("bf16", "fp32")
        for s in ("Llama-3-8B", "SmolLM2-135M", "Llama-3-70B"))
    for r in fused:  # RoPE takes 8 heads per program: its registers do not grow with the model's heads
        assert r["spill_bytes"] == 0 and r["registers"] <= (64 if r["kernel"] == "rope_store" else 128), r
        # RMSNorm and SiLU-and-multiply, which a matmul follows, let it start if launched for PDL
        assert r["all"].get("PREEXIT", 0) == (r["kernel"] != "rope_store") and "ACQBULK" not in r["all"], r


MMA_64_ROW_TILES = [  # (bits, group, BN, BK, num_warps, joined tile?) as mma_one_dot decides; BK >= 16 words
    (4, 128, 128, 128, 4, False), (8, 64, 128, 64, 4, False), (4, 128, 256, 128, 8, False), (8, 128, 256, 64, 8, False),
    (4, 64, 128, 128, 4, True), (4, 128, 256, 128, 4, True), (4, 128, 64, 128, 4, True), (4, 128, 128, 128, 8, True)]


def test_64_row_mma_tiles_compile_as_launched():
    """The joined tile fails to compile ("Illegal shared layout", Triton 3.6 and 3.9) at 64 rows,
    one scale group per K tile and 32 columns per warp; quant_matmul launches those with a dot per
    value position, and its neighbours keep the joined tile. Each compiles as launched."""
    from inferkit.kernels.quant_matmul import mma_one_dot

    for bits, group, bn, bk, warps, joined in MMA_64_ROW_TILES:
        assert mma_one_dot(True, 64, bn, bk, warps, False, group) is joined
    calls = [dict(M=64, bits=bits, group=group, BN=bn, BK=bk, num_warps=warps)
             for bits, group, bn, bk, warps, _ in MMA_64_ROW_TILES]
    assert compile_quant_matmuls(calls) == len(MMA_64_ROW_TILES)


SWAP_TILES = [  # (rows, group, BN, BK asked, num_warps, ONE_DOT asked, ONE_DOT launched): the K tile is the group's
    (3, 64, 16, 128, 4, False, True), (5, 64, 16, 128, 1, False, True), (3, 32, 32, 128, 4, False, True),
    (3, 128, 32, 128, 4, False, False), (20, 128, 64, 128, 4, False, False), (40, 64, 64, 128, 4, True, True),
]


def test_swap_tiles_compile_as_launched():
    """A dot per value position is BK / 8 deep and the tensor cores take 16 at least: the compiler
    rejects it under K tiles of 128 (groups of 32 and 64; an H100 run found it, the interpreter
    runs it), so quant_matmul launches those with the joined tile (``swap_one_dot``). Each of
    the swap kernel's tiles here, as the unit tests launch them, compiles as launched."""
    from inferkit.kernels.quant_matmul import swap_one_dot, swap_tile_k

    for _, group, _, bk, _, asked, joined in SWAP_TILES:
        assert swap_one_dot(asked, swap_tile_k(bk, group, False)) is joined
    calls = [dict(M=rows, bits=4, group=group, BN=bn, BK=bk, split=2, num_warps=warps, one_dot=one_dot, swap=True)
             for rows, group, bn, bk, warps, one_dot, _ in SWAP_TILES]
    assert compile_quant_matmuls(calls) == len(SWAP_TILES)


PDL_CASES = [  # (rows, quant_matmul_kernel options, 16-byte word loads per thread before the wait)
    (1, dict(BN=64, num_warps=2, split=4), 4),  # the H100 table's decode tile: one tile of words
    (1, dict(BN=64, num_warps=2, split=4, prefetch=3), 12),  # the 3 tiles PREFETCH loads ahead
    (1, dict(BN=128, num_warps=8, split=4, stages=4), 0),  # the pipelined loop waits first
    (1, dict(BN=128, num_warps=4, split=4, swap=True), 4),  # the swap kernel's first tile
    (1, dict(BN=64, num_warps=4, split=4, swap=True, one_dot=False), 2),
    (16, dict(BN=64, num_warps=4, split=4), 0),  # the MMA kernel waits before its pipelined loop
]


def test_pdl_kernels_read_only_weights_before_the_wait():
    """Under PDL a kernel may start while the one before it still runs: before the wait
    (``griddepcontrol.wait``, SASS ACQBULK) it may read its weights and nothing else, write
    nothing, and it lets the next one start (``launch_dependents``, PREEXIT) first. Compiled for
    sm_90, each kernel loads exactly its first tiles' words there (16-byte loads) besides kernel
    parameters (LDC); its hot loop is the plain launch's."""
    script = ("import json, sys\nfrom inferkit.kernels import sass\n"
              "for rows, kw, _ in json.loads(sys.argv[1]):\n"
              "    plain, pdl = (sass.quant_matmul_kernel(rows, pdl=p, **kw) for p in (False, True))\n"
              "    ops, waits = sass.before_wait(pdl)\n"
              "    print(json.dumps([ops, waits, sum(sass.inspect(plain).loop.values()),"
              " sum(sass.inspect(pdl).loop.values()), sass.before_wait(plain)[1]]), flush=True)\n")
    results = [json.loads(line) for line in run_compiles(script, PDL_CASES)]
    assert len(results) == len(PDL_CASES)
    for (rows, kw, words), (ops, waits, plain_loop, pdl_loop, plain_waits) in zip(PDL_CASES, results):
        assert waits and not plain_waits, kw  # the wait is there under PDL only
        assert "PREEXIT" in ops, kw
        memory = [op for op in ops if op.startswith(("LD", "ST", "RED", "ATOM", "SU", "TLD"))]
        assert [op for op in memory if op != "LDC"] == ["LDG.E.128"] * words, (kw, memory)
        # the swap kernel's first tile, out of its loop, moves ptxas's choices a little: 342 vs 343, 264 vs 271
        assert pdl_loop == plain_loop if not kw.get("swap") else abs(pdl_loop - plain_loop) <= 0.03 * plain_loop, kw
