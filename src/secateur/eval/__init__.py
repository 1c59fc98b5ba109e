"""Evaluation: perplexity under the published protocol."""

from secateur.eval.perplexity import perplexity

__all__ = ["perplexity"]
