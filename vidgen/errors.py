"""Errors a user can act on.

Every error vidgen raises on bad input is a `VidgenError`: its message names the input (file, URI,
config key), the field and what was expected. The CLI prints it on one line and exits 2; stack traces
appear only with `--debug`.
"""

import re

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


def raised_remotely(e: BaseException) -> VidgenError | None:
    """The VidgenError a Ray task or actor raised, as the driver can rethrow it in its own one line, or None.

    Ray wraps it: a task's or actor method's RayTaskError keeps it as `.cause` (and is itself an instance of its
    class, with a traceback for a message); an actor that fails in its constructor reaches the caller as an
    ActorDiedError that keeps only the text, "vidgen.errors.<Class>: <message>" on its last line."""
    first, seen = e, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            e = cause
            continue
        if isinstance(e, VidgenError) and not hasattr(e, "traceback_str"):
            return e
        e = e.__cause__
    found = re.findall(r"vidgen\.errors\.(\w+): (.+)", str(first))
    if found:
        name, message = found[-1]
        cls = globals().get(name)
        if isinstance(cls, type) and issubclass(cls, VidgenError):
            return cls(message.strip())
    return None


def ray_failure(e: BaseException) -> tuple[bool, str]:
    """(whether the failed actor had started, one line on why) for an error Ray raised on the driver: an actor that
    died in its constructor is told by its cause (the last line of Ray's text), anything else by its first line."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if line.strip()]
    if "raised in its creation task" in (lines[0] if lines else ""):
        return False, f"an actor failed to start: {lines[-1]}"
    return True, f"{type(e).__name__}: {lines[0] if lines else ''}"
