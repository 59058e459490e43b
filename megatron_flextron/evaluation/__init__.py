"""Evaluation: perplexity (per sub-network or budget), zero-shot multiple choice, reports."""
