"""Offline text corpora and tokenizers."""
