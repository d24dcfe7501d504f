"""Write the quantized artifact folder: safetensors, config, tokenizer, manifest."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from inferkit.artifacts import atomic_output_dir, sha256_file, write_json, write_manifest
from inferkit.config import Recipe
from inferkit.models.loading import LoadedModel
from inferkit.quant import compressed
from inferkit.quant.compressed import PackedWeight
from inferkit.tensorfile import save_safetensors
from inferkit.quant.scheme import QuantFormat

WEIGHTS = "model.safetensors"


def quantized_state_dict(model: torch.nn.Module, packed: dict[str, PackedWeight]) -> dict[str, torch.Tensor]:
    """Plain tensors for everything but the quantized linears, which become packed tensors."""
    state = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if layer in packed and leaf == "weight":
            continue
        if tied and key == "lm_head.weight":
            continue  # tied to the embeddings: stored once, as transformers does
        state[key] = tensor.detach().contiguous()
    for name, pw in packed.items():
        for suffix, tensor in pw.tensors.items():
            state[f"{name}.{suffix}"] = tensor
    return state


def input_hashes(folder: Path, gguf_file: str | None) -> dict[str, str]:
    """sha256 of the files the artifact was made from (weights, config, tokenizer)."""
    if gguf_file:
        return {gguf_file: sha256_file(folder / gguf_file)}
    wanted = ("*.safetensors", "config.json", "tokenizer*.json", "generation_config.json")
    files = sorted({p for pattern in wanted for p in folder.glob(pattern) if p.is_file()})
    return {p.name: sha256_file(p) for p in files}


def write_quantized_artifact(loaded: LoadedModel, packed: dict[str, PackedWeight],
                             plan: dict[str, QuantFormat | None], recipe: Recipe, out: Path,
                             overwrite: bool, extra: dict, files: dict[str, Path] | None = None) -> dict:
    """The artifact folder; ``files`` (name in the artifact → file) are copied in, e.g. reports."""
    model = loaded.model
    q = recipe.quantize
    with atomic_output_dir(out, overwrite) as tmp:
        save_safetensors(quantized_state_dict(model, packed), tmp / WEIGHTS, metadata={"format": "pt"})
        if os.environ.get("INFERKIT_TEST_SLOW_QUANTIZE"):  # tests: be killed with the folder half-written
            time.sleep(60)
        config = json.loads(model.config.to_json_string(use_diff=False))
        config.pop("quantization_config", None)
        if "lm_head" in packed:
            config["tie_word_embeddings"] = False  # the head is stored quantized, apart from the embeddings
        config["quantization_config"] = compressed.quantization_config(
            plan, actorder=q.actorder and q.method == "gptq", scale_search=q.scale_search)
        write_json(tmp / "config.json", config)
        model.generation_config.save_pretrained(tmp)
        for name, src in (files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        manifest = {
            **extra,
            "format": "compressed-tensors/pack-quantized",
            "source": {
                "path": loaded.source.display,
                "inputs_sha256": input_hashes(loaded.source.folder, loaded.source.gguf_file),
            },
            "recipe": recipe.to_dict(),
            "layers": {name: (fmt.name if fmt else "full-precision") for name, fmt in plan.items()},
        }
        manifest = write_manifest(tmp, manifest)
    return manifest
