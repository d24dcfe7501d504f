"""Programmatic dependent launch (PDL; NVIDIA sm_90 and later), shared by the kernels.

A kernel launched for PDL may start while the kernel before it in the stream is still running:
once every program of that kernel has signalled (``signal``) or exited. Before its ``wait`` it
must read only what no running kernel writes (a model's weights) and write nothing; after it,
the kernel before has finished and its writes are visible. The dequantizing matmul can be
launched so (``PDL`` in its config); the element-wise and attention kernels that precede it in
a decode step signal at their start, so that it can start during their last programs' work.
Both instructions compile only for NVIDIA GPUs; the interpreter runs the kernels without them.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PTX = not INTERPRET and torch.version.hip is None  # compiled for an NVIDIA GPU (quant_matmul's inline PTX too)
_GDC = tl.constexpr(PTX)  # griddepcontrol: compiled only
_CAPABLE: dict = {}


def capable(device: torch.device) -> bool:
    """Whether kernels on ``device`` can take part in PDL: compiled for an NVIDIA GPU of compute
    capability 9.0 or later."""
    if device.type != "cuda" or not PTX:
        return False
    if device not in _CAPABLE:
        _CAPABLE[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return _CAPABLE[device]


@triton.jit
def signal(ON: tl.constexpr):
    """Let the next kernel in the stream, if it is launched for PDL, start once every program of
    this one has passed here (``griddepcontrol.launch_dependents``; without a PDL kernel next it
    does nothing)."""
    if ON and _GDC:
        gdc_launch_dependents()


@triton.jit
def wait(ON: tl.constexpr):
    """Wait until the kernel before this one has finished and its writes are visible
    (``griddepcontrol.wait``; in a plain launch it returns at once)."""
    if ON and _GDC:
        gdc_wait()
