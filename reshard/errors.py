"""User-facing errors.

Every error a user can cause raises a subclass of :class:`ReshardError` whose message says
what went wrong, why, and what to do. ``assert`` is kept for internal invariants only.
"""


class ReshardError(Exception):
    """Base class for errors caused by the input or the configuration."""


class SourceError(ReshardError):
    """The source checkpoint is missing, unreadable, incomplete or inconsistent."""


class ConfigError(ReshardError):
    """The configuration is invalid or disagrees with the checkpoint."""


class LayoutError(ConfigError):
    """The target layout does not divide the model."""


class TargetError(ReshardError):
    """The target cannot be written (exists, not writable, ...)."""


class UnsupportedError(ReshardError):
    """An architecture, tensor or format this version does not support."""


class PeerError(ReshardError):
    """Another rank failed; its own log holds the cause."""


class WriteError(ReshardError):
    """Writing the target failed on at least one rank; nothing was committed."""


class VerifyError(ReshardError):
    """What was written is not what was read: nothing is committed."""
