"""Model input: HF folders, GGUF files, the demo model, architecture checks."""

from inferkit.models.loading import LoadedModel, load_model, resolve_model_path

__all__ = ["LoadedModel", "load_model", "resolve_model_path"]
