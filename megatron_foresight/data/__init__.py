"""Data: tokenizers, corpora and Megatron indexed datasets."""
