"""Quality measures: perplexity over fixed windows, KL divergence against a reference."""

from inferkit.eval.perplexity import EvalWindows, evaluate, text_windows

__all__ = ["EvalWindows", "evaluate", "text_windows"]
