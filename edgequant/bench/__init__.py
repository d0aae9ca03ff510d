"""Perplexity, KL divergence, speed and reports (see issue: bench)."""
