"""Figures and tables written next to results."""
