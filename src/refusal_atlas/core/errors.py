"""User-facing errors.

Every problem caused by input (a bad path, a malformed file, an out-of-range layer) raises a
subclass of :class:`RefusalAtlasError`. The CLI prints its message on one line and exits non-zero;
anything else escaping is a bug and keeps its traceback.
"""


class RefusalAtlasError(Exception):
    """Base class for errors a user can fix by changing their input."""


class DataError(RefusalAtlasError):
    """A prompt set is missing, empty or malformed."""


class ModelError(RefusalAtlasError):
    """A model cannot be found, verified, loaded or is not supported."""


class ConfigError(RefusalAtlasError):
    """An option is out of range or inconsistent with the model or run directory."""


class ResourceError(RefusalAtlasError):
    """A job would not fit this machine's memory or disk (checked before it starts)."""


class ArtifactError(RefusalAtlasError):
    """A run-directory artifact is missing or corrupt."""


class NotFittedError(RefusalAtlasError, AttributeError):
    """A fitted attribute (``directions_``, ``scores_``, ...) was read before ``fit``.

    Also an AttributeError, so ``hasattr(estimator, "directions_")`` is False until it is fitted.
    """
