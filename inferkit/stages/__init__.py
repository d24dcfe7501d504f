"""Pipeline stages: orchestration and file I/O around the pure maths in ``inferkit.quant``."""
