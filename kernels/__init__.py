"""Triton GPU kernels, installed as ``inferkit.kernels``.

Only imported lazily by the runtime on CUDA machines; nothing here is needed on the CPU.
The paged-attention and dequantizing-matmul kernels arrive with the runtime work.
"""
