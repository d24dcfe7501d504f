"""Triton GPU kernels, installed as ``inferkit.kernels``: paged decode attention
(``paged_attention``), the layer's element-wise steps with the KV-cache write (``fused``:
RMSNorm with the residual add, RoPE with the K/V scatter, SiLU-and-multiply), the dequantizing matmul
(``quant_matmul``) with its measured per-GPU tile tables (``tuned``, ``configs/``) and the
sweep that measures them (``tune``, behind ``inferkit tune-kernels``), programmatic dependent
launch between them on sm_90 (``pdl``), and an offline sm_90 compile-and-inspect tool (``sass``).

Imported lazily by the runtime when a Triton backend is chosen (CUDA, or the CPU interpreter
with ``TRITON_INTERPRET=1``); nothing here is needed by the PyTorch backends.
"""
