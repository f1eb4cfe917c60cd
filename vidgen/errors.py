"""Errors a user can act on.

Every error vidgen raises on bad input is a `VidgenError`: its message names the input (file, URI,
config key), the field and what was expected. The CLI prints it on one line and exits 2; stack traces
appear only with `--debug`.
"""


class VidgenError(Exception):
    """Base class: a message fit to show a user as is."""


class ConfigError(VidgenError):
    """A config file, key or value is wrong."""


class StorageError(VidgenError):
    """A URI cannot be read or written."""


class DataError(VidgenError):
    """Input data is missing, malformed, or too much of it was skipped."""


class ModelError(VidgenError):
    """Model weights are missing or do not fit the requested model."""


class JobError(VidgenError):
    """A Ray job (training, generation, evaluation) failed."""
