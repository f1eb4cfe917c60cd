"""vidgen on a Ray cluster of several nodes: what a single-node Ray cannot show.

One cluster for the module (tests/multinode.py): a head node with no CPUs (the GCS, the dashboard, and the node
every `vidgen` driver attaches to) and worker nodes w1, w2, each with 2 CPUs, its own resource `node_<name>` and
one `trainslot`; the node-loss test adds a spare, w3, shaped the same. Training asks each worker for
{CPU: 1, trainslot: 1}, so its two workers always land on two different nodes. Every node is its own
`ray start --block` session with S3 credentials in its environment (never in a runtime env); all S3 traffic of
the cluster goes through an S3Gate proxy in front of the moto server, which lets the node-loss test freeze a run
at an exact point. The vidgen CLI runs as a subprocess with `ray.address=` the cluster; this pytest process never
connects to it (it has its own session Ray): node ids come from Ray's state API, read by short subprocesses.

Asserted, on the node ids Ray reports:
- a local run.workdir is refused (exit 2, one line on stderr naming run.workdir and the node count), and
  run.shared_filesystem=true lets the same config past that check;
- `vidgen generate` writing to S3 runs its actors on more than one node, and actors on at least two nodes make
  the videos (finished actor tasks per node: one per video), all of them in the manifest on S3;
- `vidgen train` with 2 workers on 2 nodes, checkpoints on S3 and validation videos logged to MLflow, loses a whole
  node (SIGKILL to every process of it) right after its first checkpoint is registered, and FINISHES (the outcome
  asserted, not a one-line failure): it resumes on the surviving node plus the spare, Ray reports the lost worker
  as killed by its node's death, and every step of train/loss is in MLflow exactly once. The gate holds writes
  to a second checkpoint until Ray Train has written the registration of the first, then holds all S3 traffic
  until the node is dead: the loss always falls between the first and the second checkpoint, whatever the
  machine's speed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from multinode import Cluster, S3Gate

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="finds and kills a node's processes through /proc")]

REPO = Path(__file__).resolve().parents[1]
VIDGEN = Path(sys.executable).parent / "vidgen"
WORKERS = ("w1", "w2")
SPARE = "w3"
SLOT = {"trainslot": 1}
DEMO = str(REPO / "jobs" / "configs" / "demo.yaml")


@dataclass
class MultiNode:
    cluster: Cluster
    gate: S3Gate
    bucket: str
    root: Path
    env: dict[str, str]  # the nodes' environment; the vidgen drivers get the same
    names: dict[str, str]  # node id -> head | w1 | w2 | w3
    drivers: list[subprocess.Popen] = field(default_factory=list)

    def vidgen(self, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        """`vidgen ARGS ray.address=<the cluster>` as a subprocess (killed at teardown if still running)."""
        proc = subprocess.Popen([str(VIDGEN), *args, f"ray.address={self.cluster.address}"], env=env or self.env,
                                cwd=REPO, text=True, **kw)
        self.drivers.append(proc)
        return proc

    def run(self, *args: str, timeout: float, env: dict[str, str] | None = None) -> tuple[int, str]:
        """(exit status, stderr) of a `vidgen` run to its end."""
        proc = self.vidgen(*args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err

    def add_node(self, name: str) -> None:
        self.cluster.add_worker(name, {f"node_{name}": 1, **SLOT}, num_cpus=2)

    def wait_for_nodes(self) -> None:
        """Until every started node is alive; learns their ids."""
        for n in self.cluster.wait_for_nodes(len(self.cluster.nodes)):
            (name,) = [k.removeprefix("node_") for k in n["Resources"] if k.startswith("node_")]
            self.names[n["NodeID"]] = name
        assert sorted(self.names.values()) == sorted(self.cluster.nodes), self.names

    def state(self, what: str, **filters: str) -> list[dict]:
        """Rows of ray.util.state.list_<what> (detail), with `node` = the node's name."""
        flt = [(k, "=", v) for k, v in filters.items()]
        call = (f"list_{what}(address={self.cluster.address!r}, filters={flt!r}, detail=True, limit=10000, "
                "raise_on_missing_output=False)")
        rows = self.cluster.query(f"[asdict(r) for r in {call}]",
                                  setup=f"from dataclasses import asdict; from ray.util.state import list_{what}")
        for r in rows:
            r["node"] = self.names.get(r.get("node_id") or "", r.get("node_id"))
        return rows


def checkpoints(run_dir: str) -> list[str]:
    """Ray Train's checkpoint_<timestamp> folders of a run, oldest first."""
    from vidgen import storage

    return sorted(u for u in storage.listdir(run_dir) if re.match(r"checkpoint_\d", u.rstrip("/").rsplit("/", 1)[-1]))


def node_env(s3_endpoint: str) -> dict[str, str]:
    """What every node and driver gets: this environment without Ray's, MLflow's or accelerator settings (the code
    under test decides DS_ACCELERATOR per worker), plus S3 credentials and a token every node shares."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "AWS_")) and k != "DS_ACCELERATOR"}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
               VIDGEN_S3_ENDPOINT_URL=s3_endpoint,
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),  # Ray 2.59+: one token, every node
               RAY_USAGE_STATS_ENABLED="0",
               # A dead node is declared dead after ~3 s instead of ~15-30 s.
               RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
               RAY_health_check_initial_delay_ms="1000")
    return env


@pytest.fixture(scope="module")
def mn(s3_server, tmp_path_factory):
    from vidgen.data.synth import make_moving_shapes

    root = tmp_path_factory.mktemp("multinode")
    bucket = s3_server.bucket()
    make_moving_shapes(f"{bucket}/clips", 4, 8, 64, 64, seed=0)  # straight to the server, not through the gate
    gate = S3Gate(s3_server.endpoint)
    env = node_env(gate.url)
    cluster = Cluster(root, env)
    mn = MultiNode(cluster, gate, bucket, root, env, {})
    try:
        cluster.start_head({"node_head": 1}, num_cpus=0)
        for name in WORKERS:
            mn.add_node(name)
        mn.wait_for_nodes()
        yield mn
    finally:
        for proc in mn.drivers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cluster.shutdown()
        gate.stop()


def test_local_output_is_refused_unless_shared(mn, tmp_path):
    """Validation videos and checkpoints that workers on other nodes write to a local path never reach the
    driver: refused before anything starts, in one line; run.shared_filesystem=true vouches for the path."""
    local = tmp_path / "work"
    common = ["train", "--config", DEMO, f"run.workdir={local}"]
    refused = mn.vidgen(*common, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Past the check, the next thing train needs is data.source (unset here): that error shows the check passed.
    shared = mn.vidgen(*common, f"tracking.uri=sqlite:///{tmp_path}/shared.db", "run.shared_filesystem=true",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = refused.communicate(timeout=180)
    lines = [line for line in err.splitlines() if line.strip()]
    assert refused.returncode == 2, err[-3000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err[-3000:]}"
    assert lines[0].startswith(f"vidgen: error: run.workdir={local}: "), lines[0]
    assert f"the Ray cluster has {1 + len(WORKERS)} nodes" in lines[0] and "run.shared_filesystem" in lines[0]

    _, err = shared.communicate(timeout=180)
    assert shared.returncode == 2, err[-3000:]
    assert "data.source" in err.splitlines()[-1] and "run.workdir=" not in err, err[-3000:]


def test_generation_actors_spread_over_nodes(mn):
    from vidgen import storage

    n = 6
    prompts = f"{mn.bucket}/prompts.jsonl"
    storage.write_text(prompts, "".join(json.dumps({"image": f"{mn.bucket}/clips/sample_{i % 4:03d}/0.png",
                                                    "prompt": "shapes", "seed": i, "id": f"v{i}"}) + "\n"
                                        for i in range(n)))
    out = f"{mn.bucket}/generated"
    # The pool's 3 actors (1 CPU each; each worker node has 2) cannot all sit on one node. Ray Data is told to wait
    # for all of them before handing out rows, so that each gets some (Ray Data's own setting, not vidgen's).
    env = {**mn.env, "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "180"}
    t0 = time.monotonic()
    rc, err = mn.run("generate", "--config", DEMO, "run.name=mn-gen", f"run.workdir={mn.bucket}/gen-work",
                     f"tracking.uri=sqlite:///{mn.root}/mlflow-gen.db", f"generate.prompts={prompts}",
                     f"generate.output={out}", "generate.sampler=base", "generate.num_frames=4",
                     "generate.num_inference_steps=2", "generate.num_actors=3", env=env, timeout=300)
    assert rc == 0, err[-4000:]
    seconds = time.monotonic() - t0

    rows = [json.loads(line) for line in storage.read_text(f"{out}/manifest.jsonl").splitlines() if line.strip()]
    assert len(rows) == n and {r["status"] for r in rows} == {"generated"}, rows
    assert all(storage.exists(r["path"]) for r in rows)

    actors = [a for a in mn.state("actors") if "VideoGenerator" in (a.get("class_name") or "")
              or "MapWorker" in (a.get("class_name") or "")]
    actor_nodes = {a["actor_id"]: a["node"] for a in actors}
    # One `submit` task per batch, and every batch is one video (batch_size=1).
    tasks = [t for t in mn.state("tasks", state="FINISHED") if t.get("actor_id") in actor_nodes
             and t["name"].endswith(".submit")]
    per_node = Counter(t["node"] for t in tasks)
    print(f"\ngeneration ({seconds:.0f} s): actors on {sorted(set(actor_nodes.values()))}, "
          f"videos made per node {dict(per_node)}; node ids {mn.names}")
    assert len(set(actor_nodes.values())) >= 2 and "head" not in actor_nodes.values(), actors
    assert sum(per_node.values()) == n and len(per_node) >= 2, per_node


def test_training_survives_the_loss_of_a_node(mn):
    """2 workers on w1 and w2; once the first checkpoint is registered, the spare w3 joins and one of the two nodes
    dies; the run finishes on the other one and w3, with every step logged once. Checkpoints and validation videos
    go to S3; the driver logs the videos to MLflow. The node lost is the one that also hosts the driver's metrics
    actor when one does: losing a worker node must not lose what the driver owns."""
    from mlflow import MlflowClient

    from vidgen import storage

    run, steps = "mn-train", 4
    db = f"sqlite:///{mn.root}/mlflow-train.db"
    args = ["train", "--config", DEMO, f"data.source={mn.bucket}/clips", f"run.workdir={mn.bucket}/work",
            f"run.name={run}", f"train.storage_path={mn.bucket}/ckpt", f"tracking.uri={db}",
            f"train.max_steps={steps}", "train.checkpoint_every=2", "train.validation_every=2",
            "train.validation_count=1", "train.validation_steps=2", "train.max_failures=3",
            "train.resources_per_worker={CPU: 1, trainslot: 1}"]
    # Freeze the run (every S3 request held) once Ray Train has registered its first checkpoint, before any second.
    mn.gate.freeze_after_first_checkpoint(f"/{mn.bucket.removeprefix('s3://')}/ckpt/{run}/")
    t0 = time.monotonic()
    with open(mn.root / "train.out", "w") as out, open(mn.root / "train.err", "w") as err:
        proc = mn.vidgen(*args, stdout=out, stderr=err)
    try:
        while not mn.gate.frozen.wait(1):
            assert proc.poll() is None, f"train exited ({proc.returncode}) before its first checkpoint:\n" \
                                        f"{(mn.root / 'train.err').read_text()[-4000:]}"
            assert time.monotonic() - t0 < 300, "no first checkpoint within 300 s"
        t_frozen = time.monotonic() - t0
        hosts = {name: node.processes_named("ray::RayTrainWorker") for name, node in mn.cluster.nodes.items()}
        with_workers = sorted(name for name, pids in hosts.items() if pids)
        assert with_workers == list(WORKERS), hosts
        frozen_ckpts = checkpoints(f"{mn.bucket}/ckpt/{run}")
        sink = [name for name, node in mn.cluster.nodes.items() if node.processes_named("ray::MetricsSink")]
        mn.add_node(SPARE)
        mn.wait_for_nodes()
        victim = sink[0] if sink and sink[0] in WORKERS else WORKERS[-1]
        mn.cluster.kill_node(victim)
    finally:
        mn.gate.release()
    rc = proc.wait(timeout=360)
    seconds = time.monotonic() - t0
    assert rc == 0, (mn.root / "train.err").read_text()[-5000:]

    # -- where the workers ran: the victim and the survivor first, then the survivor and the spare -------------
    workers = mn.state("actors", class_name="RayTrainWorker")
    per_node = Counter(a["node"] for a in workers)
    (survivor,) = set(WORKERS) - {victim}
    print(f"\ntraining ({seconds:.0f} s, frozen after {t_frozen:.0f} s): {victim} killed, {survivor} survived, "
          f"{SPARE} joined; metrics actor on {sink}; RayTrainWorker actors per node {dict(per_node)}; "
          f"node ids {sorted({(a['node'], a['node_id']) for a in workers})}")
    assert len(frozen_ckpts) == 1, frozen_ckpts  # the node died between the first and the second checkpoint
    assert per_node[victim] == 1 and per_node[survivor] >= 2 and per_node[SPARE] >= 1, per_node
    assert set(per_node) == {victim, survivor, SPARE}, per_node
    (lost,) = [a for a in workers if a["node"] == victim]
    assert "NODE_DIED" in json.dumps(lost.get("death_cause")), lost  # Ray saw a node die, not a process

    # -- checkpoints and export on S3 -----------------------------------------------------------------------
    ckpts = checkpoints(f"{mn.bucket}/ckpt/{run}")
    assert ckpts, storage.listdir(f"{mn.bucket}/ckpt/{run}")
    names = {u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(ckpts[-1])}
    assert {"vidgen-manifest.0-of-2.json", "vidgen-manifest.1-of-2.json", "latest"} <= names, names
    assert storage.exists(f"{mn.bucket}/ckpt/{run}/export/unet/config.json")  # beside its checkpoints

    # -- MLflow: every step once, the validation videos -------------------------------------------------------
    client = MlflowClient(db)
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert r.info.status == "FINISHED"
    losses = client.get_metric_history(r.info.run_id, "train/loss")
    assert sorted(m.step for m in losses) == list(range(1, steps + 1)), \
        f"train/loss steps {sorted(m.step for m in losses)} (the driver's metrics actor was on {sink})"
    videos = {d.path: [a.path for a in client.list_artifacts(r.info.run_id, d.path)]
              for d in client.list_artifacts(r.info.run_id, "validation")}
    assert sorted(videos) == ["validation/step00000002", "validation/step00000004"], videos
    assert all(len(v) == 1 and v[0].endswith(".mp4") for v in videos.values()), videos
