"""The registry of named calibration sets and inferkit's own seed samples (package data)."""
