"""Datasets and input pipelines: formats, readers, shards, Hugging Face data, the index cache, image IO, the sampler,
transforms, the demo data."""
