"""Exceptions whose messages are meant for the user.

Every error that a user can cause (a bad file, a wrong shape, a model that does not fit) is
raised as a :class:`PaintsegError` subclass with a message that names the file, the shape or the
value at fault. The CLI prints the message and exits non-zero; the GUI shows it as a
notification. Anything else is a bug.
"""

from __future__ import annotations

__all__ = ["PaintsegError", "InputError", "CheckpointError", "OutputError", "ConfigError",
           "StopRequested"]


class PaintsegError(Exception):
    """Base class of errors whose message is shown to the user as is."""


class InputError(PaintsegError, ValueError):
    """An input image or label file cannot be used (missing, corrupt, wrong shape, NaN...)."""


class CheckpointError(PaintsegError, ValueError):
    """A model file is not a paintseg checkpoint, is damaged, or does not fit the data."""


class OutputError(PaintsegError, OSError):
    """An output cannot be written (folder missing or not writable, disk full...)."""


class ConfigError(PaintsegError, ValueError):
    """A setting is unknown or out of range (a model, tiling, training or segment option)."""


class StopRequested(PaintsegError):
    """A long-running job was stopped by the user before it finished."""
