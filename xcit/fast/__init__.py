"""Faster forwards for the model's modules: the CPU family choice (:mod:`xcit.fast.cpu`), fused oneDNN kernels
(:mod:`xcit.fast.fused`), the fast paths (:mod:`xcit.fast.fastpath`) and the subclasses that use them
(:mod:`xcit.fast.forwards`), switched on with :func:`accelerate` and off with :func:`plain`."""

from .forwards import accelerate, is_accelerated, plain, plain_forwards

__all__ = ["accelerate", "is_accelerated", "plain", "plain_forwards"]
