"""Faster forwards for the model's modules: the CPU family choice, fused oneDNN kernels and the fast paths."""
