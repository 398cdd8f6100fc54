"""The benchmark: throughput against timm, CPU paths, data pipelines and formats."""
