"""Evaluation beyond perplexity: zero-shot multiple-choice tasks."""
