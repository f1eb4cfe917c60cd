"""MLflow run lifecycle for a vidgen job. The driver logs; workers and actors never do.

Workers return metrics and file paths to the driver, which logs them through one `Tracker`:

    with Tracker(resolve_tracking_uri(cfg.tracking.uri, cfg.run.workdir), "vidgen", "svd-lora") as t:
        t.log_config(cfg.model_dump(mode="json"))
        t.log_metrics({"loss": 0.12}, step=10)
        t.log_video("s3://bucket/out/sample.mp4")
    print(t.ui_command())

One `Tracker` makes one run, ended FINISHED, FAILED when an exception escapes the `with` block, or
KILLED on Ctrl-C (or SIGTERM, see vidgen.signals). With `run_file` (a training run's, beside its checkpoints) it
writes the run's id there, and a later start with the same file continues that run, RUNNING again, instead.
The first use of a sqlite store (its schema created and migrated) happens under a lock file beside it.
Every call goes through an `MlflowClient` bound to the tracking URI, never through
mlflow's global state, so two trackers on different stores in one process do not interfere.
The default store is a sqlite file in the run's workdir (sqlite has one writer: the driver), with
artifacts beside it in `mlartifacts/`; clusters point `MLFLOW_TRACKING_URI` at an `mlflow server`.
Params, tags, the logged config and every message showing the URI pass through `vidgen.redact` first: a
password in the URI or a credential variable's value never reaches the store or a log line.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import io
import json
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from vidgen import storage
from vidgen.access import credentials_refused
from vidgen.errors import ConfigError, StorageError
from vidgen.redact import redact, redact_obj

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation); fixed here so that importing this module stays cheap.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
MAX_KEY_LENGTH = 250
UI_PORT = 5000
# Outages: a call that fails for a reason other than bad input is kept in order and retried, at most every
# RETRY_S while the server is down, and at exit for up to FLUSH_S (VIDGEN_TRACKING_FLUSH_S). MLflow's own HTTP
# retries (minutes by default) are shortened so that a down server never stalls the job that logs.
RETRY_S = 5.0
FLUSH_S = float(os.environ.get("VIDGEN_TRACKING_FLUSH_S", "120"))
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BAD_INPUT_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
                   "RESOURCE_DOES_NOT_EXIST", "PERMISSION_DENIED", "UNAUTHENTICATED"}


def resolve_tracking_uri(uri: str | None, workdir: str) -> str:
    """The tracking URI to use: `uri` if given, else $MLFLOW_TRACKING_URI, else a sqlite file in workdir."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    local = storage.local_path(workdir)
    if local is None:
        raise ConfigError(
            f"run.workdir={workdir!r} is remote, and the default MLflow store is a sqlite file that must be "
            "local: set tracking.uri (or $MLFLOW_TRACKING_URI) to an mlflow server URL or a local sqlite:/// URI"
        )
    return f"sqlite:///{local}/mlflow.db"


def _sqlite_file(uri: str) -> str | None:
    """The database file of a sqlite:/// URI (None for in-memory and non-sqlite stores)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return path if path and path != ":memory:" else None


def _plain(obj: Any) -> Any:
    """Turn a config into YAML/JSON-safe data (tuples, paths, enums, numpy scalars...)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _key(name: str) -> str:
    """A name MLflow accepts: its character set, no '..' or leading '/', at most 250 characters."""
    key = re.sub(r"[^/\w.\- ]", "_", str(name)).strip("/")
    key = re.sub(r"/{2,}", "/", key).replace("..", "_.")
    return key[:MAX_KEY_LENGTH] or "_"


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) else str(value)
    text = redact(text)
    if len(text) > MAX_PARAM_VALUE_LENGTH:  # the whole value is in config.yaml
        text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
    return text


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


class Tracker:
    """One MLflow run; every method is a no-op when `enabled` is False (then run_id is None)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, enabled: bool = True,
                 run_file: str | None = None):
        self._uri, self._experiment, self._run_name, self.enabled = tracking_uri, experiment, run_name, enabled
        self._run_file = run_file  # a JSON file naming the run to continue (see `_continue`); written when new
        self._logged_params: dict[str, str] = {}  # a continued run's params: MLflow keeps a param's first value
        self._shown = redact(tracking_uri)  # the URI as messages show it: a password in it is masked
        self._client: Any = None
        self._run_id: str | None = None
        self._experiment_id: str | None = None
        self._pending: list[tuple[str, Any]] = []  # (what, call) not yet accepted by the store, in order
        self._next_try = 0.0
        self._down_since: float | None = None
        self._spool: str | None = None  # copies of remote artifacts waiting to be logged
        self._lock = threading.RLock()  # the driver logs from its main thread and fit's metric pump

    # -- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if not self.enabled:
            return self
        if self._run_id is not None:
            raise RuntimeError(f"Tracker for run {self._run_name!r} is already started: one run per Tracker")
        for k, v in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        from mlflow import MlflowClient  # lazy: seconds to import, paid only by jobs that track

        try:
            with _store_lock(self._uri):  # the first use of a sqlite file creates and migrates its schema
                self._client = MlflowClient(tracking_uri=self._uri)
                self._experiment_id = self._ensure_experiment()
            self._run_id = self._continue()
            if self._run_id is None:
                self._run_id = self._client.create_run(self._experiment_id, run_name=self._run_name).info.run_id
                if self._run_file:
                    storage.write_json(self._run_file, {"run_id": self._run_id, "experiment_id": self._experiment_id,
                                                        "tracking_uri": self._shown})
        except Exception as e:  # a wrong URI, a server that is down, a store we may not write
            if refused := credentials_refused(e):
                raise refused from e
            raise ConfigError(redact(f"tracking.uri={self._uri!r}: cannot start an MLflow run in experiment "
                                     f"{self._experiment!r}: {e}")) from e
        log.info("MLflow run %s (%s) in experiment %r at %s", self._run_name, self._run_id, self._experiment,
                 self._shown)
        return self

    def _continue(self) -> str | None:
        """The run named by `run_file` (written by an earlier start of the same job), set RUNNING again; None when
        there is none to continue: no file, another store or experiment, a deleted run."""
        if not self._run_file or not storage.exists(self._run_file):
            return None
        try:
            doc = json.loads(storage.read_text(self._run_file))
            run_id = str(doc["run_id"])
            same = doc.get("tracking_uri") == self._shown and doc.get("experiment_id") == self._experiment_id
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s: unreadable (%s); starting a new MLflow run", self._run_file, type(e).__name__)
            return None
        if not same:
            return None
        from mlflow.exceptions import MlflowException  # lazy: MLflow takes seconds to import

        try:
            run = self._client.get_run(run_id)
        except MlflowException:  # deleted for good
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self._client.update_run(run_id, status="RUNNING")
        self._logged_params = dict(run.data.params)
        log.info("continuing MLflow run %s (%s), %s before", run_id, self._run_name, run.info.status)
        return run_id

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.enabled or self._run_id is None:
            return
        status = ("FINISHED" if exc_type is None else
                  "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        self.flush(FLUSH_S)
        if self._pending:  # the job's own work is done and kept; only these records are missing
            log.error("MLflow at %s: %d logging calls could not be delivered in %.0f s (%s ...)", self._shown,
                      len(self._pending), FLUSH_S, ", ".join(w for w, _ in self._pending[:3]))
        try:
            printed = io.StringIO()  # MLflow prints "View run <name> at: <tracking URI>...": masked first
            with contextlib.redirect_stdout(printed):
                self._client.set_terminated(self._run_id, status=status)
            sys.stdout.write(redact(printed.getvalue()))
        except Exception as e:  # never fail a finished job over its tracking record; keep the real error
            log.error("could not mark MLflow run %s %s: %s", self._run_id, status, str(e).splitlines()[0])
        if self._spool:
            shutil.rmtree(self._spool, ignore_errors=True)

    def _ensure_experiment(self) -> str:
        from mlflow.exceptions import MlflowException  # lazy: MLflow takes seconds to import

        exp = self._client.get_experiment_by_name(self._experiment)
        if exp is None:
            location = None
            if db := _sqlite_file(self._uri):  # artifacts beside the database, not in the current directory
                location = (Path(db).resolve().parent / "mlartifacts").as_uri()
            try:
                return self._client.create_experiment(self._experiment, artifact_location=location)
            except MlflowException:  # created meanwhile by another process
                exp = self._client.get_experiment_by_name(self._experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            log.warning("MLflow experiment %r was deleted; restoring it", self._experiment)
            self._client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    # -- properties -----------------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def experiment_id(self) -> str | None:
        return self._experiment_id

    def _active(self) -> bool:
        if not self.enabled:
            return False
        if self._run_id is None:
            raise RuntimeError("Tracker is not started: use it as `with Tracker(...) as t:`")
        return True

    # -- delivery: in order, buffered through outages ------------------------------------------------------

    @property
    def pending(self) -> int:
        """Logging calls waiting for the store (non-zero only during an outage)."""
        return len(self._pending)

    def _send(self, what: str, call) -> None:
        with self._lock:
            self._pending.append((what, call))
            if time.monotonic() >= self._next_try:
                self._deliver()

    def _deliver(self) -> None:
        with self._lock:
            self._deliver_locked()

    def _deliver_locked(self) -> None:
        while self._pending:
            what, call = self._pending[0]
            try:
                call()
            except Exception as e:
                if _is_bad_input(e):  # retrying cannot help: this call is the bug, say so
                    self._pending.pop(0)
                    raise
                self._next_try = time.monotonic() + RETRY_S
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("MLflow at %s unreachable (%s); buffering logging calls and retrying every "
                                "%.0f s", self._shown, redact(_first_line(e)), RETRY_S)
                return
            self._pending.pop(0)
        if self._down_since is not None:
            log.warning("MLflow at %s is back after %.0f s; buffered calls delivered", self._shown,
                        time.monotonic() - self._down_since)
            self._down_since = None

    def flush(self, timeout: float = FLUSH_S) -> bool:
        """Deliver what is buffered, retrying for up to `timeout` seconds; True when nothing is left."""
        deadline = time.monotonic() + timeout
        while self._pending:
            self._deliver()
            if not self._pending or time.monotonic() >= deadline:
                break
            time.sleep(min(RETRY_S, max(0.0, deadline - time.monotonic())))
            self._next_try = 0.0
        return not self._pending

    # -- logging --------------------------------------------------------------------------------------

    def log_config(self, cfg: Mapping[str, Any]) -> None:
        """The resolved config: whole as `config.yaml`, and flattened as params (`train.lr`)."""
        if not self._active():
            return
        plain = redact_obj(_plain(cfg))
        text = yaml.safe_dump(plain, sort_keys=False)
        self._send("config.yaml", lambda: self._client.log_text(self._run_id, text, "config.yaml"))
        self.log_params(_flatten(plain))

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self._active():
            return
        from mlflow.entities import Param  # lazy: MLflow takes seconds to import

        # A dict: two keys that sanitize alike must not reach one batch twice (MLflow rejects duplicates).
        flat = {_key(k): _param_value(v) for k, v in params.items()}
        changed = sorted(k for k, v in flat.items() if self._logged_params.get(k, v) != v)
        if changed:  # a continued run: MLflow refuses to change a param; config.yaml holds the new values
            log.warning("MLflow run %s keeps its first values of %s (this start's config: config.yaml)",
                        self._run_id, ", ".join(changed))
        flat = {k: v for k, v in flat.items() if k not in self._logged_params}
        entries = [Param(k, v) for k, v in flat.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._send("params", lambda c=chunk: self._client.log_batch(self._run_id, params=c))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None,
                    timestamp: float | None = None) -> None:
        """`timestamp`: when the values were measured (Unix s); default now."""
        if not self._active():
            return
        from mlflow.entities import Metric  # lazy: MLflow takes seconds to import

        ms = int((time.time() if timestamp is None else timestamp) * 1000)
        entries = [Metric(_key(k), float(v), ms, int(step or 0)) for k, v in metrics.items()]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self._send(f"metrics@{step}", lambda c=chunk: self._client.log_batch(self._run_id, metrics=c))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._active():
            return
        from mlflow.entities import RunTag  # lazy: MLflow takes seconds to import

        entries = [RunTag(_key(k), redact(str(v))) for k, v in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self._send("tags", lambda c=chunk: self._client.log_batch(self._run_id, tags=c))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        """Log a file or directory; `path` may be a remote URI (workers return those), copied first."""
        if not self._active():
            return
        local = storage.local_path(path)
        if local is not None:
            if not os.path.exists(local):
                raise StorageError(f"{path}: not found")
            upload = self._client.log_artifacts if os.path.isdir(local) else self._client.log_artifact
            with self._lock:
                self._send(f"artifact {path}", lambda: upload(self._run_id, local, artifact_path))
                if self._pending and not local.startswith(self._spool or "\0"):
                    # Buffered: the caller may delete its file as soon as we return (a temporary grid video).
                    what, _ = self._pending[-1]
                    copy = self._spool_path(path)
                    (shutil.copytree if os.path.isdir(local) else shutil.copy2)(local, copy)
                    self._pending[-1] = (what, lambda: upload(self._run_id, copy, artifact_path))
            return
        name = self._spool_path(path)
        if storage.isdir(path):
            storage.download_dir(path, name)
        else:
            storage.write_bytes(name, storage.read_bytes(path))
        self.log_artifact(name, artifact_path)

    def _spool_path(self, path: str) -> str:
        """A fresh path with `path`'s base name in this run's spool folder (removed at exit)."""
        self._spool = self._spool or tempfile.mkdtemp(prefix="vidgen-artifact-")
        return os.path.join(tempfile.mkdtemp(dir=self._spool), path.rstrip("/").rsplit("/", 1)[-1])

    def log_video(self, path: str, artifact_path: str = "videos") -> None:
        self.log_artifact(path, artifact_path)

    # -- UI -------------------------------------------------------------------------------------------

    def ui_command(self) -> str:
        """How to look at this run: the run page of a server, or the `mlflow ui` command for a local store."""
        if not self.enabled:
            return ""
        if self._uri.startswith(("http://", "https://")):
            base = self._shown.rstrip("/")
            if self._run_id is None:
                return base
            return f"{base}/#/experiments/{self._experiment_id}/runs/{self._run_id}"
        return f"mlflow ui --backend-store-uri {shlex.quote(self._shown)} --port {UI_PORT}"


@contextlib.contextmanager
def _store_lock(uri: str):
    """For a sqlite store, an exclusive lock on `<file>.lock` beside it: two jobs started at once on a fresh workdir
    would otherwise both run MLflow's schema migration, and one fails ("Online migration expected to match one row").
    """
    db = _sqlite_file(uri)
    if db is None:
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)  # sqlite makes files, not dirs
    fd = os.open(f"{os.path.abspath(db)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):  # a filesystem without locks: as before, unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when the holder exits, even killed
        yield
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _is_bad_input(e: BaseException) -> bool:
    """An MLflow rejection of the call itself (bad key/value, duplicate param): not an outage."""
    return getattr(e, "error_code", None) in BAD_INPUT_CODES
