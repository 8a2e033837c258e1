"""Datasets turned into deterministic, reproducible splits."""

from ffmerge.data.text import load_documents, load_split, prepare_text_splits, read_splits_record

__all__ = ["load_documents", "load_split", "prepare_text_splits", "read_splits_record"]
