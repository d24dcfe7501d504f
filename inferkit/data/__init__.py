"""Calibration sources: built-in sets, local files, Hugging Face datasets."""

from inferkit.data.calibration import CalibrationConfig, build_samples, load_documents

__all__ = ["CalibrationConfig", "build_samples", "load_documents"]
