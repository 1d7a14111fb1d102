"""The data: sources in the formats corpora ship in, tokenizers, prepare_data.py's pipeline and workers,
what a prepared directory holds, and what a training run streams from it."""
