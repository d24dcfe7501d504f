"""Triton GPU kernels, installed as ``inferkit.kernels``: paged decode attention
(``paged_attention``), the layer's element-wise steps with the KV-cache write (``fused``:
RMSNorm with the residual add, RoPE with the K/V scatter, SiLU-and-multiply), the dequantizing matmul
(``quant_matmul``) with its measured per-GPU tile tables (``tuned``, ``configs/``) and the
sweep that measures them (``tune``, behind ``inferkit tune-kernels``), programmatic dependent
launch between them on sm_90 (``pdl``), and an offline sm_90 compile-and-inspect tool (``sass``).

Imported lazily by the runtime when a Triton backend is chosen (CUDA, or the CPU interpreter
with ``TRITON_INTERPRET=1``); nothing here is needed by the PyTorch backends.
"""

# Multiply-add contraction, stated at every launch as the GPU measurements had it (Triton's default
# through 3.9): Triton 3.9 warns once per process when a launch leaves it unset, and 3.10 turns it
# off by default. The hot loops write their multiply-adds out (``tl.fma``) and are checked compiled
# without contraction (tests/unit/test_kernels_sm90.py); the RoPE kernel turns it off (``fused``).
FP_FUSION = {"enable_fp_fusion": True}
