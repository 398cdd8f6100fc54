"""The ``xcit`` command: the entry point and one module per command."""

from .main import main

__all__ = ["main"]
