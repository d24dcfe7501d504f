"""Draft models for speculative decoding. This release builds the student side: a shallow
student cut from the teacher (``--student-layers N``); training it is the next step."""

from __future__ import annotations

import json
from pathlib import Path

from inferkit.errors import InferkitError


def student_layer_indices(num_teacher_layers: int, num_layers: int) -> list[int]:
    """``num_layers`` teacher layers, evenly spaced from the first, always ending with the last."""
    if not 1 <= num_layers <= num_teacher_layers:
        raise InferkitError(f"--student-layers must be between 1 and the teacher's {num_teacher_layers}, got {num_layers}")
    if num_layers == 1:
        return [num_teacher_layers - 1]
    step = (num_teacher_layers - 1) / (num_layers - 1)
    return sorted({round(i * step) for i in range(num_layers)})


def build_student(teacher: str | Path, num_layers: int, out: Path, overwrite: bool = False) -> Path:
    """A student with ``num_layers`` of the teacher's decoder layers, and its embeddings, final
    norm and head, written as a Hugging Face folder with the teacher's tokenizer."""
    import torch

    from inferkit.artifacts import atomic_output_dir
    from inferkit.models import load_model

    loaded = load_model(teacher)
    model = loaded.model
    keep = student_layer_indices(model.config.num_hidden_layers, num_layers)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in keep)
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "student.json").write_text(json.dumps({"teacher": loaded.source.display, "teacher_layers_kept": keep}) + "\n")
    return out
