"""Errors a user can act on.

Every error vidgen raises on bad input is a `VidgenError`: its message names the input (file, URI,
config key), the field and what was expected. The CLI prints it on one line and exits 2; stack traces
appear only with `--debug`.
"""

from vidgen.redact import redact


class VidgenError(Exception):
    """Base class: a message fit to show a user as is. Credentials in it are masked when it is made (a URI with a
    password, a credential variable's value: vidgen.redact), so no log, traceback or Ray error record holds them."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(redact(str(message)), *args)


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


def brief(e: BaseException, limit: int = 200) -> str:
    """The first line of a lower-level exception, cut to `limit` characters: for the "(...)" part of a
    VidgenError message (torch's and safetensors' own messages can run to dozens of lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
