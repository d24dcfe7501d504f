"""Run calibration samples through a decoder one layer at a time.

Only one decoder layer's inputs (and the statistics gathered on them) live in memory at
once besides the weights, which is what lets calibration and GPTQ scale to large models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from inferkit.quant.hessian import InputStats
from inferkit.stages.timer import PhaseTimer


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering the current layer, one entry per batch, and the keyword
    arguments the model passes every layer (rotary embeddings, mask, positions).

    The batches are views into one buffer [samples, seq, hidden], and each layer's output is
    copied back into its input's place: the only allocations per batch are the layer's own
    temporaries, of the same sizes every time, which keeps the C heap from fragmenting.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)  # each [batch, seq, hidden]
    kwargs: list[dict] = field(default_factory=list)

    def replace(self, i: int, out) -> None:
        self.hidden[i].copy_(out[0] if isinstance(out, tuple) else out)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def linear_modules(layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """Full name → module for every linear layer inside one decoder layer, in order."""
    return {f"{prefix}.{name}": mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


@torch.no_grad()
def capture_first_inputs(model: nn.Module, samples: torch.Tensor, batch_size: int) -> LayerInputs:
    """Embed ``samples`` [n, seq] and catch what the model hands its first decoder layer."""
    first = decoder_layers(model)[0]
    inputs = LayerInputs()
    buffer: list[torch.Tensor] = []
    done = 0

    def hook(_module, args, kwargs):
        nonlocal done
        hidden = args[0] if args else kwargs.pop("hidden_states")
        # No KV cache during calibration: drop whatever cache arguments this version passes.
        kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value", "cache", "use_cache")}
        if not buffer:
            buffer.append(hidden.new_empty((samples.shape[0], *hidden.shape[1:])))
        view = buffer[0][done:done + hidden.shape[0]]
        view.copy_(hidden)
        done += hidden.shape[0]
        inputs.hidden.append(view)
        inputs.kwargs.append(kwargs)
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in samples.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs


@torch.no_grad()
def advance(layer: nn.Module, inputs: LayerInputs) -> None:
    """Forward every batch through ``layer``, replacing each input by its output in place,
    so only one set of activations (plus one batch) is alive at a time."""
    for i, kwargs in enumerate(inputs.kwargs):
        inputs.replace(i, layer(inputs.hidden[i], **kwargs))


class InputRecorder:
    """Forward pre-hooks on a layer's linears that hand each distinct input tensor to ``sink``.

    Linears fed the same tensor (q/k/v, gate/up) are recognised on the first batch and
    recorded once, under the first of them: ``shared[name] = owner``.
    """

    def __init__(self, linears: dict[str, nn.Linear], sink: Callable[[str, torch.Tensor], None]) -> None:
        self.shared: dict[str, str] = {}
        # data_ptr → (first linear fed it, the tensor): holding the tensor keeps its memory
        # from being reused by a later activation within the same batch.
        self._seen: dict[int, tuple[str, torch.Tensor]] = {}
        self._sink = sink
        self.order: list[str] = []  # execution order seen on the first batch
        self._handles = [mod.register_forward_pre_hook(self._hook(name)) for name, mod in linears.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            self._record(name, args[0])

        return hook

    def _record(self, name: str, x: torch.Tensor) -> None:
        if name not in self.shared:
            owner, _ = self._seen.setdefault(x.data_ptr(), (name, x))
            self.shared[name] = owner
            self.order.append(name)
        if self.shared[name] == name:
            self._sink(name, x.detach())

    def new_batch(self) -> None:
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def record_layer(layer: nn.Module, inputs: LayerInputs, linears: dict[str, nn.Linear],
                 sink: Callable[[str, torch.Tensor], None], advance_inputs: bool) -> dict[str, str]:
    """Run ``layer`` over all batches with recording hooks; returns the shared-input map.

    With ``advance_inputs`` each input is replaced by the layer's output in place. Without
    it each batch stops as soon as the last linear's input is recorded: the rest of the
    layer (the down projection's matmul) would be computed for nothing.
    """
    recorder = InputRecorder(linears, sink)
    stopper = None
    try:
        for i, kwargs in enumerate(inputs.kwargs):
            recorder.new_batch()
            try:
                out = layer(inputs.hidden[i], **kwargs)
            except _StopForward:
                continue
            if advance_inputs:
                inputs.replace(i, out)
            elif stopper is None and recorder.order:
                # The first batch shows which linear runs last; later batches stop there.
                # Registered after the recorder's own hook, so it fires once the input is recorded.
                stopper = linears[recorder.order[-1]].register_forward_pre_hook(_stop_forward)
    finally:
        recorder.remove()
        if stopper is not None:
            stopper.remove()
    return recorder.shared


def _stop_forward(_module, _args):
    raise _StopForward


def gather_input_stats(layer: nn.Module, inputs: LayerInputs, linears: dict[str, nn.Linear],
                       advance_inputs: bool, timer: PhaseTimer) -> tuple[dict[str, InputStats], dict[str, str]]:
    """Statistics (``XᵀX``, absmax, count) of every distinct linear input of ``layer`` over all
    batches, keyed by owner, and the name → owner map of linears sharing an input."""
    stats: dict[str, InputStats] = {}

    def sink(name: str, x: torch.Tensor) -> None:
        with timer.phase("hessian"):
            stats.setdefault(name, InputStats(x.shape[-1])).add(x)

    with timer.phase("forward"):
        shared = record_layer(layer, inputs, linears, sink, advance_inputs)
    return stats, shared
