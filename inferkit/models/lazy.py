"""Decoder linear weights read from the checkpoint only when a stage needs them.

Layer-wise stages (sequential GPTQ, RTN) touch one decoder layer at a time, so holding every
weight of the model for the whole run is the largest avoidable cost in memory. A lazily loaded
model keeps embeddings, norms and biases resident and leaves the decoder layers' linear weights
on the meta device; ``LazyWeights.load`` reads those of one layer from the safetensors files,
and the stage drops them again once the layer is done. Peak memory then holds the embeddings,
one layer and the calibration activations, whatever the depth of the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from inferkit.errors import InferkitError

INDEX = "model.safetensors.index.json"


def checkpoint_files(folder: Path) -> dict[str, Path] | None:
    """Tensor name → safetensors file holding it, or None when the folder has no safetensors."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise InferkitError(f"{index} is not a safetensors index: {exc}") from exc
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    where = {}
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                where[name] = file
    return where


def _open(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise InferkitError(f"cannot read {file}: {exc}") from exc


@dataclass
class LazyWeights:
    """Reads linear weights left on the meta device by ``build_lazy_model``."""

    files: dict[str, Path]
    dtype: torch.dtype

    def load(self, linears: dict[str, nn.Linear]) -> None:
        """Give every meta-device linear in ``linears`` (name → module) its checkpoint weight."""
        read_tensors({f"{name}.weight": mod for name, mod in linears.items() if mod.weight.is_meta}, self.files, self.dtype)

    @staticmethod
    def release(linears: dict[str, nn.Linear]) -> None:
        """Send the weights of ``linears`` back to the meta device, freeing their memory."""
        for mod in linears.values():
            mod.weight = nn.Parameter(torch.empty_like(mod.weight, device="meta"), requires_grad=False)


    def offload_embeddings(self, model: nn.Module) -> None:
        emb = model.get_input_embeddings()
        meta = nn.Parameter(torch.empty_like(emb.weight, device="meta"), requires_grad=False)
        head = model.get_output_embeddings()
        if head is not None and head.weight is emb.weight:
            head.weight = meta
        emb.weight = meta

    def restore_embeddings(self, model: nn.Module) -> None:
        emb = model.get_input_embeddings()
        if not emb.weight.is_meta:
            return
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        read_tensors({f"{_module_name(model, emb)}.weight": emb}, self.files, self.dtype)
        if tied:
            head.weight = emb.weight


def _module_name(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, mod in model.named_modules() if mod is target)


def read_tensors(targets: dict[str, nn.Module], files: dict[str, Path], dtype: torch.dtype) -> None:
    """Set each ``targets`` key (``owner.leaf``) on its module from the checkpoint, one file
    open at a time; floating tensors are cast to ``dtype``, shapes are checked."""
    by_file: dict[Path, list[str]] = {}
    for key in targets:
        by_file.setdefault(files[key], []).append(key)
    for file, keys in by_file.items():
        with _open(file) as f:
            for key in keys:
                mod, leaf = targets[key], key.rpartition(".")[2]
                tensor = f.get_tensor(key)
                expected = tuple(getattr(mod, leaf).shape)
                if tuple(tensor.shape) != expected:
                    raise InferkitError(f"{file.name}: {key} has shape {tuple(tensor.shape)}, the model expects {expected}")
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                else:
                    tensor = tensor.clone()  # own memory, not pages of the mapped file
                setattr(mod, leaf, nn.Parameter(tensor, requires_grad=False))


def lazy_linear_names(model: nn.Module) -> set[str]:
    """Linear layers inside the decoder layers: the weights worth loading one layer at a time."""
    return {name for name, mod in model.model.layers.named_modules(prefix="model.layers") if isinstance(mod, nn.Linear)}


def build_lazy_model(config, folder: Path, dtype: torch.dtype):
    """A model whose decoder linear weights stay on the meta device, plus their reader.

    Returns None when the checkpoint's tensor names do not match the model's (a layout this
    loader does not know); the caller then loads the model whole.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    files = checkpoint_files(folder)
    if files is None:
        return None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lazy = lazy_linear_names(model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = {}
    for key in params:
        owner, _, leaf = key.rpartition(".")
        if owner in lazy and leaf == "weight":
            if key not in files:
                return None
            continue
        if key not in files:
            if tied and key == "lm_head.weight":
                continue
            return None
        wanted[key] = owner
    modules = dict(model.named_modules())
    read_tensors({key: modules[owner] for key, owner in wanted.items()}, files, dtype)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    for key, param in model.named_parameters():
        owner, _, leaf = key.rpartition(".")
        if param.is_meta and not (owner in lazy and leaf == "weight"):
            return None
    model.eval()
    return model, LazyWeights(files, dtype)

