"""`ray job submit` against a real Ray head on loopback, exactly as cluster/README.md tells users to: the repo's
runtime env, deterministic submission ids, token authentication on. A demo-size training job, then a generation
job with the UNet it exported; both must end SUCCEEDED according to the Jobs API (not just exit 0: a STOPPED
job exits 0 too).

This head is a second Ray cluster beside the session's in-process one (`ray_session`), so it is started with
`ray start --block` in its own process group and stopped by signalling that group: `ray stop` would kill every
Ray process on the machine, the session's cluster included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from servers import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `python`: jobs run `python jobs/...` from PATH
PORT_FLAGS = ["--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
              "--node-manager-port", "--object-manager-port"]

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_head():
    """A token-authenticated Ray head with a dashboard on 127.0.0.1: (address, env for the CLI, token)."""
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay short
    ports = dict(zip(PORT_FLAGS, [free_port() for _ in PORT_FLAGS], strict=True))
    token = secrets.token_hex(32)  # made here, never stored: it reaches Ray only through the environment
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
           # SIGTERM otherwise waits up to 30 s for the node to drain (meant for Serve upgrades); tear down now.
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)  # the CLI must use the --address given, not a cluster from the environment
    args = [str(BIN / "ray"), "start", "--head", "--block", "--dashboard-host", "127.0.0.1",
            "--num-cpus", "4", "--include-dashboard=true", "--temp-dir", tmp,
            "--disable-usage-stats"]
    for flag, port in ports.items():
        args += [flag, str(port)]
    log = open(Path(tmp) / "head.log", "w")  # noqa: SIM115 - closed in the teardown
    head = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    try:
        _wait_for_dashboard(address, token, head, Path(tmp) / "head.log")
        yield address, env, token
    finally:
        # SIGTERM to `ray start --block` drains and stops the processes it started (this head only).
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_dashboard(address: str, token: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            text = log.read_text()
            hint = ("\nThe Jobs API needs the dashboard: install ray[default] (aiohttp_cors, opencensus, ...)."
                    if "missing packages" in text else "")
            pytest.fail(f"ray start --head exited with {head.returncode}:\n{text[-3000:]}{hint}")
        try:
            # Even /api/version wants the token: a 401 here would mean auth is on but the token wrong.
            if requests.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"},
                            timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(1)
    pytest.fail(f"Ray dashboard at {address} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def _submit(address: str, env: dict, submission_id: str, entrypoint: list[str]) -> subprocess.CompletedProcess:
    """The README's command: runtime env from the repo, a deterministic id, logs followed to the end."""
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--runtime-env", "jobs/runtime_env.yaml",
           "--submission-id", submission_id, "--entrypoint-num-cpus", "0.1", "--", *entrypoint]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _status(client, job_id: str, submitted: subprocess.CompletedProcess):
    """The job's status; when the head has no such job, what `ray job submit` said (exit status and output)."""
    try:
        return client.get_job_status(job_id)
    except RuntimeError as e:
        pytest.fail(f"{e}\n`ray job submit` exited {submitted.returncode}:\n{submitted.stdout[-3000:]}\n"
                    f"{submitted.stderr[-3000:]}")


def test_submit_train_then_generate(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env, token = ray_head
    # Paths are absolute: the job runs in a copy of the working dir, not in ROOT.
    data, work = tmp_path / "data", tmp_path / "work"
    subprocess.run([str(BIN / "vidgen"), "prepare", "synth", str(data), "--videos", "4", "--frames", "8"],
                   check=True, env=env, capture_output=True, timeout=60)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"image": str(data / "sample_000" / "0.png")}) + "\n")

    # The token goes in an explicit header: this process may already hold the session cluster's token.
    client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
    run = uuid.uuid4().hex[:8]
    train_id, gen_id = f"test-train-{run}", f"test-generate-{run}"

    train = _submit(address, env, train_id, [
        "python", "jobs/train.py", "--config", "jobs/configs/demo.yaml", "train.max_steps=2",
        "train.checkpoint_every=2", "train.num_workers=1", f"data.source={data}", f"run.workdir={work}"])
    assert _status(client, train_id, train) == JobStatus.SUCCEEDED, train.stdout[-4000:] + train.stderr[-4000:]
    assert train.returncode == 0
    unet = work / "train" / "demo" / "export" / "unet"  # demo.yaml: run.name=demo; the export is per run
    assert (unet / "config.json").is_file(), sorted(p.name for p in work.rglob("*"))[:50]

    gen = _submit(address, env, gen_id, [
        "python", "jobs/generate.py", "--config", "jobs/configs/demo.yaml", f"generate.prompts={prompts}",
        f"generate.unet={unet}", "generate.num_frames=8", f"run.workdir={work}"])
    assert _status(client, gen_id, gen) == JobStatus.SUCCEEDED, gen.stdout[-4000:] + gen.stderr[-4000:]
    videos = sorted((work / "generated" / "videos").glob("*.mp4"))
    assert len(videos) == 1 and videos[0].stat().st_size > 0

    # The id is deterministic, so a retry of the same submission is refused rather than run twice.
    again = _submit(address, env, gen_id, ["python", "-c", "print('never runs')"])
    assert again.returncode != 0 and "already exists" in (again.stdout + again.stderr)
    assert {j.submission_id for j in client.list_jobs()} >= {train_id, gen_id}


def test_jobs_api_requires_the_token(ray_head):
    from ray.job_submission import JobSubmissionClient

    address, _, _ = ray_head
    with pytest.raises(Exception, match="(?i)auth"):
        JobSubmissionClient(address, headers={"Authorization": "Bearer not-the-token"}).list_jobs()
