"""inferkit: prepare language models for cheap, fast serving."""

__version__ = "0.1.0"
