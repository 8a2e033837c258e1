"""Quality metrics of compressed models."""

from ffmerge.metrics.perplexity import PerplexityResult, sliding_window_perplexity

__all__ = ["PerplexityResult", "sliding_window_perplexity"]
