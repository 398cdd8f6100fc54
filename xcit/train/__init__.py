"""Training: fit, the loop, optimisers and schedules, EMA, losses, distillation, divergence, the run lock, logs,
evaluation.

The package is callable: ``xcit.train(config, **keys)`` runs :func:`xcit.train.fit.run_config`.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    """``xcit.train(config, **keys)`` runs :func:`~xcit.train.fit.run_config`; ``xcit.train.fit`` and the other
    submodules stay this package's (a package attribute cannot be both a submodule and a function)."""

    def __call__(self, config: Any = None, **keys: Any) -> dict:
        from .fit import run_config

        return run_config(config, **keys)


sys.modules[__name__].__class__ = _CallableModule
