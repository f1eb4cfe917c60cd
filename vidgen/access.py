"""Credentials a service refused, as the one line that says what to set (instead of "internal error").

    if (e2 := credentials_refused(e)) is not None:
        raise e2 from e

Recognised without importing Ray or MLflow (the CLI calls this on any exception):
- Ray's token authentication (Ray 2.52+, on by default from 2.59): `ray.exceptions.AuthenticationError`; Ray reads
  the token from RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, and uses it
  when RAY_AUTH_MODE=token.
- An MLflow tracking server answering 401 or 403: MLflow's error codes UNAUTHENTICATED, CUSTOMER_UNAUTHORIZED,
  PERMISSION_DENIED, or an artifact request's HTTP error. MLflow sends MLFLOW_TRACKING_TOKEN as a bearer token,
  or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD as basic auth.
"""

from __future__ import annotations

from vidgen.errors import ConfigError, brief
from vidgen.redact import redact

RAY_HINT = ("set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it) and "
            "RAY_AUTH_MODE=token; `ray get-auth-token` on the head node prints it")
MLFLOW_HINT = ("set MLFLOW_TRACKING_TOKEN (a bearer token), or MLFLOW_TRACKING_USERNAME and "
               "MLFLOW_TRACKING_PASSWORD, to credentials the server accepts")
MLFLOW_CODES = {"UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED", "PERMISSION_DENIED"}


def _chain(e: BaseException):
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        cause = getattr(x, "cause", None)  # Ray's RayTaskError keeps the task's exception here
        todo += [x.__cause__, x.__context__, cause if isinstance(cause, BaseException) else None]


def _http_status(x: BaseException) -> int | None:
    status = getattr(getattr(x, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def credentials_refused(e: BaseException) -> ConfigError | None:
    """A ConfigError naming what to set when `e` (or an exception it came from) is a refusal of credentials."""
    for x in _chain(e):
        module, name = type(x).__module__, type(x).__name__
        if module.startswith("ray") and name == "AuthenticationError":
            first = str(getattr(x, "message", "") or "token authentication failed").splitlines()[0]
            return ConfigError(f"the Ray cluster refused this connection ({first}): {RAY_HINT}")
        if module.startswith("mlflow"):
            code = getattr(x, "error_code", None)
            if code in MLFLOW_CODES:
                status = "403 forbidden" if code == "PERMISSION_DENIED" else "401 unauthenticated"
                return ConfigError(redact(f"the MLflow tracking server refused the request ({status}: "
                                          f"{brief(x, 160)}): {MLFLOW_HINT}"))
        if module.startswith(("requests", "mlflow")) and _http_status(x) in (401, 403):
            return ConfigError(redact(f"the MLflow tracking server refused the request (HTTP {_http_status(x)}: "
                                      f"{brief(x, 160)}): {MLFLOW_HINT}"))
    return None

