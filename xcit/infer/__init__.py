"""Inference: predictions and their results files, attention maps, export."""
