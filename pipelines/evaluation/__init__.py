"""Evaluation datasets and metrics (no Dagster imports): captioning CIDEr, VQA accuracy, ..."""
