"""`jobs/nightly_eval.py`: run tonight's eval here, or submit it to a Ray cluster once per suite and date.

    python jobs/nightly_eval.py --config jobs/configs/nightly_eval.yaml              # run here / in a Ray job
    python jobs/nightly_eval.py --submit http://HEAD:8265 --config jobs/configs/nightly_eval.yaml

Submitting uses the deterministic id `nightly-<suite>-<date>`: a second submission the same night follows the
first job instead of starting another, and only SUCCEEDED exits 0 (`ray job submit` itself exits 0 for a
STOPPED job, operations.md 2.1). A night that FAILED or was STOPPED is resubmitted only with --retry, as
`nightly-<suite>-<date>-retry<N>`; the job then resumes tonight's MLflow run and output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from vidgen.cluster import runtime_env_dict_errors
from vidgen.config import VidgenConfig, load_config
from vidgen.errors import ConfigError, VidgenError, raised_remotely
from vidgen.eval.nightly import check_config, exit_status, night_date, run_nightly, submission_id, summary
from vidgen.ray_env import init_ray
from vidgen.redact import install_log_filter, redact

EXIT_OK, EXIT_FAILED = 0, 1

# ------------------------------------------------------------------------------------------- ray job submit

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _status(value: Any) -> str:
    return str(getattr(value, "value", value))


def submit_nightly(client: Any, submission: str, entrypoint: str, runtime_env: dict | None = None,
                   retry: bool = False, wait: bool = True, poll_s: float = 5.0, timeout_s: float | None = None,
                   entrypoint_num_cpus: float = 1, echo: Callable[[str], None] = print) -> int:
    """Submit tonight's job once (or follow the one already submitted) and exit 0 only for SUCCEEDED.

    `client` is a `ray.job_submission.JobSubmissionClient`. Attempts are `<submission>`, then
    `<submission>-retry1`, ... : a night whose last attempt FAILED or was STOPPED is resubmitted only with
    `retry` (the job resumes tonight's MLflow run and folder); a SUCCEEDED night is not run again.
    """
    attempts = sorted((j for j in client.list_jobs() if _attempt(j.submission_id, submission) is not None),
                      key=lambda j: _attempt(j.submission_id, submission))
    job = attempts[-1] if attempts else None
    if job is not None:
        status = _status(job.status)
        echo(f"{job.submission_id}: already submitted, {status}")
        if status == "SUCCEEDED":
            return EXIT_OK
        if status in ("FAILED", "STOPPED") and not retry:
            echo(f"{job.submission_id} ended {status}; rerun with --retry to resume tonight's run")
            return EXIT_FAILED
    if job is None or _status(job.status) in ("FAILED", "STOPPED"):
        n = 0 if job is None else _attempt(job.submission_id, submission) + 1
        sid = submission if n == 0 else f"{submission}-retry{n}"
        try:
            client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env,
                              entrypoint_num_cpus=entrypoint_num_cpus,
                              metadata={"vidgen.job": "nightly", "vidgen.night": submission})
            echo(f"{sid}: submitted: {entrypoint}")
        except RuntimeError as e:  # a concurrent submitter won the race: follow its job
            if "already exists" not in str(e):
                raise
            echo(f"{sid}: submitted meanwhile by someone else; following it")
    else:
        sid = job.submission_id
    if not wait:
        return EXIT_OK
    return follow(client, sid, poll_s=poll_s, timeout_s=timeout_s, echo=echo)


def _attempt(sid: str | None, submission: str) -> int | None:
    if sid == submission:
        return 0
    if sid and sid.startswith(submission + "-retry") and sid[len(submission) + 6:].isdigit():
        return int(sid[len(submission) + 6:])
    return None


def follow(client: Any, sid: str, poll_s: float = 5.0, timeout_s: float | None = None,
           echo: Callable[[str], None] = print) -> int:
    """Poll until the job ends; 0 for SUCCEEDED, 1 for FAILED, STOPPED or a timeout."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        status = _status(client.get_job_status(sid))
        if status != last:
            echo(f"{sid}: {status}")
            last = status
        if status in TERMINAL:
            break
        if deadline is not None and time.monotonic() > deadline:
            echo(f"{sid}: still {status} after {timeout_s:.0f} s; giving up waiting (the job keeps running)")
            return EXIT_FAILED
        time.sleep(poll_s)
    if status != "SUCCEEDED":
        logs = client.get_job_logs(sid) or ""
        echo("\n".join(logs.splitlines()[-40:]))
        echo(f"{sid}: {status}: counted as a failure")
        return EXIT_FAILED
    return EXIT_OK


# ------------------------------------------------------------------------------------------- entrypoint

SCRIPT = "jobs/nightly_eval.py"


def nightly_entrypoint(config: str | None, overrides: Sequence[str], date: str) -> str:
    """The command the submitted job runs: this script in run mode, with the date pinned (a job that runs
    past midnight, or a retry the next morning, still evaluates the night it was submitted for)."""
    argv = ["python", SCRIPT, *(["--config", config] if config else []),
            *[o for o in overrides if not o.startswith("nightly.date=")], f"nightly.date={date}"]
    return shlex.join(argv)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=SCRIPT, description="Nightly eval: generate the suite, FVD/KVD, compare with the last good night, "
        "report. Exit status 0: ok; 1: regressed or the job failed/stopped; 2: bad input.")
    p.add_argument("--config", "-c", metavar="CONFIG", help="YAML config (jobs/configs/nightly_eval.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. nightly.suite=vbench")
    p.add_argument("--submit", metavar="ADDRESS", help="submit to this Ray dashboard address (http://HEAD:8265) "
                   "as job nightly-<suite>-<date> instead of running here, then wait for its status")
    p.add_argument("--runtime-env", default="jobs/runtime_env.yaml", help="runtime env YAML for --submit")
    p.add_argument("--retry", action="store_true", help="with --submit: resubmit a night that FAILED or STOPPED")
    p.add_argument("--no-wait", action="store_true", help="with --submit: return once submitted")
    p.add_argument("--poll", type=float, default=10.0, help="with --submit: seconds between status polls")
    p.add_argument("--debug", action="store_true", help="show full stack traces on errors")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()  # credentials never reach a log line
    try:
        cfg = load_config(args.config, args.overrides)
        date = night_date(cfg.nightly.date)
        if args.submit:
            return _submit_main(args, cfg, date)
        check_config(cfg)
        init_ray(cfg)
        results = run_nightly(cfg)
        print(json.dumps(summary(results), indent=2, default=str))
        return exit_status(results)
    except Exception as e:
        error = e if isinstance(e, VidgenError) else raised_remotely(e)  # a Ray actor's own error, unwrapped
        if args.debug or error is None:
            raise
        one_line = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"nightly_eval: error: {redact(one_line)}", file=sys.stderr)
        return 2


def _submit_main(args: argparse.Namespace, cfg: VidgenConfig, date: str) -> int:
    from ray.job_submission import JobSubmissionClient  # lazy: heavy (ray)

    try:
        with open(args.runtime_env) as f:
            runtime_env = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--runtime-env {args.runtime_env}: cannot read a runtime env YAML ({e})") from None
    problems = runtime_env_dict_errors(runtime_env, f"--runtime-env {args.runtime_env}",
                                       "the cluster's nodes bring their own (instance roles, a Kubernetes Secret)")
    if problems:
        raise ConfigError("; ".join(problems))
    token = os.environ.get("RAY_AUTH_TOKEN")  # token auth (operations.md 2.4): from the environment only
    headers = {"Authorization": f"Bearer {token}"} if token else None
    client = JobSubmissionClient(args.submit, headers=headers)
    entrypoint = nightly_entrypoint(args.config, args.overrides, date)
    return submit_nightly(client, submission_id(cfg.nightly.suite, date), entrypoint, runtime_env,
                          retry=args.retry, wait=not args.no_wait, poll_s=args.poll)
