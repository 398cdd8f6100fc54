"""The package's error classes. Each is a ``ValueError`` whose message names the file, key or value at fault; the
CLI prints such an error as one line and exits with status 2."""

from __future__ import annotations


class XCiTError(ValueError):
    """The root of this package's errors: bad input that the user can fix."""


class ConfigError(XCiTError):
    """An unknown key or a value that does not fit its key. Raised before any work starts."""


class WeightsError(XCiTError):
    """A weight file that cannot be read or does not fit the model. The message names the file."""
