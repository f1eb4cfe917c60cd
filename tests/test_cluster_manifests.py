"""The cluster definitions validate offline: KubeRay kinds against the vendored CRDs (strict, like kubeconform
-strict) plus the controller's own rules, the launcher config against Ray's schema, the built-in kinds
structurally; and deliberately broken copies fail with a message that names the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from vidgen import cluster
from vidgen.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
MANIFESTS = ["raycluster.yaml", "rayjob-train.yaml", "rayjob-generate.yaml", "raycronjob-nightly-eval.yaml",
             "cronjob-fallback.yaml"]


@pytest.fixture(scope="module")
def crd_dir(shared_dir) -> Path:
    return shared_dir / "fixtures" / "kuberay-crds"


def _errors(doc: dict, crd_dir: Path) -> list[str]:
    return cluster.manifest_errors(doc, crd_dir, ROOT)


def _job(crd_dir: Path) -> dict:
    return cluster.load_manifests(KUBERAY / "rayjob-train.yaml")[0]


# ------------------------------------------------------------------------------------------- the real files


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates(name, crd_dir):
    docs = cluster.validate_file(KUBERAY / name, crd_dir, ROOT)
    assert docs and all(d["kind"] for d in docs)


def test_kinds_present(crd_dir):
    kinds = {d["kind"] for n in MANIFESTS for d in cluster.load_manifests(KUBERAY / n)}
    assert kinds == {"RayCluster", "RayJob", "RayCronJob", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                     "CronJob"}


def test_gpu_worker_group_and_head(crd_dir):
    spec = cluster.load_manifests(KUBERAY / "raycluster.yaml")[0]["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["authOptions"] == {"mode": "token"}
    (group,) = spec["workerGroupSpecs"]
    res = group["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == "8"
    assert group["minReplicas"] <= group["maxReplicas"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        group["template"]["spec"]["tolerations"]


def test_fallback_rbac_allows_only_rayjobs():
    docs = {d["kind"]: d for d in cluster.load_manifests(KUBERAY / "cronjob-fallback.yaml")}
    assert docs["Role"]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                                      "verbs": ["create", "get", "list"]}]
    pod = docs["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    assert docs["RoleBinding"]["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]
    embedded = yaml.safe_load(docs["ConfigMap"]["data"]["rayjob.yaml"])
    assert embedded["kind"] == "RayJob" and "yyyymmdd" in embedded["metadata"]["name"]


def test_launcher_config_valid_for_ray():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((ROOT / "cluster" / "launcher" / "aws-a100.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    import jsonschema

    jsonschema.validate(cfg, schema)  # the file as written: the top level forbids unknown keys
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs after filling defaults
    types = cfg["available_node_types"]
    assert {types[t]["node_config"]["InstanceType"] for t in types} >= {"p4d.24xlarge", "p4de.24xlarge"}
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]

    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["a100_40g"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="'min_worker' was unexpected"):
        jsonschema.validate(bad, schema)


def test_no_literal_tokens_in_cluster_dir():
    """Secure by default: nothing under cluster/ carries a credential value, only references to Secrets."""
    files = [p for p in (ROOT / "cluster").rglob("*") if p.is_file()] + [ROOT / "jobs" / "runtime_env.yaml"]
    assert len(files) >= 9
    for path in files:
        text = path.read_text()
        assert not cluster.SECRET_VALUE.search(text), path
        if path.suffix == ".yaml":
            for doc in yaml.safe_load_all(text):
                assert not cluster.secret_errors(doc or {}), path


# ------------------------------------------------------------------------------------------- broken copies


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"]


BROKEN = {
    "misspelled field": (lambda d: d["spec"].__setitem__("shutdownAfterJobFinish", True),
                         "spec: Additional properties are not allowed ('shutdownAfterJobFinish' was unexpected)"),
    "missing minReplicas": (lambda d: _cluster_spec(d)["workerGroupSpecs"][0].pop("minReplicas"),
                            "workerGroupSpecs.0: 'minReplicas' is a required property"),
    "string ttl": (lambda d: d["spec"].__setitem__("ttlSecondsAfterFinished", "600"),
                   "spec.ttlSecondsAfterFinished: '600' is not of type 'integer'"),
    "too-long name": (lambda d: d["metadata"].__setitem__("name", "vidgen-" + "x" * 41),
                      "metadata.name: 48 characters, at most 47 allowed for a RayJob"),
    "ttl without shutdown": (lambda d: d["spec"].__setitem__("shutdownAfterJobFinishes", False),
                             "ttlSecondsAfterFinished: 3600 > 0 requires shutdownAfterJobFinishes: true"),
    "not DNS-1035": (lambda d: d["metadata"].__setitem__("name", "Vidgen_train"), "is not a DNS-1035 label"),
    "min above max": (lambda d: _cluster_spec(d)["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2),
                      "minReplicas 5 > maxReplicas 2"),
    "no cluster": (lambda d: d["spec"].pop("rayClusterSpec"), "one of rayClusterSpec or clusterSelector"),
    "runtime env not YAML": (lambda d: d["spec"].__setitem__("runtimeEnvYAML", "env_vars: [a\n"),
                             "runtimeEnvYAML: not valid YAML"),
    "runtime env int value": (lambda d: d["spec"].__setitem__("runtimeEnvYAML", "env_vars: {A: 1}\n"),
                              "env_vars.A: values must be strings"),
    "runtime env credential": (lambda d: d["spec"].__setitem__("runtimeEnvYAML", "env_vars: {AWS_SECRET_KEY: x}"),
                               "env_vars.AWS_SECRET_KEY: credentials do not belong in a runtime env"),
    "missing script": (lambda d: d["spec"].__setitem__("entrypoint", "python jobs/nope.py --config x.yaml"),
                       "script 'jobs/nope.py' does not exist"),
    "bad config key": (lambda d: d["spec"].__setitem__(
        "entrypoint", "python jobs/train.py --config jobs/configs/svd_full.yaml train.zero_stag=3"),
        "train.zero_stag"),
    "auth off": (lambda d: _cluster_spec(d).pop("authOptions"), "Ray token auth is off"),
    "plaintext token": (lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
                        .append({"name": "RAY_AUTH_TOKEN", "value": "0123456789abcdef" * 4}),
                        "RAY_AUTH_TOKEN is a credential: use valueFrom.secretKeyRef"),
    "privileged": (lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]
                   .__setitem__("securityContext", {"privileged": True}), "privileged: must not be true"),
    "no limits": (lambda d: _cluster_spec(d)["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
                  .pop("limits"), "resources.limits: missing cpu, memory"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_rayjob_fails_with_clear_message(case, crd_dir):
    doc = copy.deepcopy(_job(crd_dir))
    assert _errors(doc, crd_dir) == []
    break_it, expected = BROKEN[case]
    break_it(doc)
    problems = _errors(doc, crd_dir)
    assert any(expected in p for p in problems), problems
    assert all(p.startswith("RayJob/") for p in problems)  # every message names the object


def test_validate_file_raises_config_error_naming_file(tmp_path, crd_dir):
    doc = copy.deepcopy(_job(crd_dir))
    doc["spec"]["shutdownAfterJobFinish"] = True
    path = tmp_path / "rayjob.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"rayjob\.yaml: 1 problem\(s\):\n.*shutdownAfterJobFinish"):
        cluster.validate_file(path, crd_dir, ROOT)


def test_raycronjob_rules(crd_dir):
    doc = cluster.load_manifests(KUBERAY / "raycronjob-nightly-eval.yaml")[0]
    long = copy.deepcopy(doc)
    long["metadata"]["name"] = "vidgen-nightly-evaluation-of-svd-full"  # 37 characters
    assert any("at most 36 allowed for a RayCronJob" in p for p in _errors(long, crd_dir))
    tz = copy.deepcopy(doc)
    tz["spec"]["schedule"] = "CRON_TZ=UTC 0 2 * * *"
    assert any("TZ/CRON_TZ prefixes are rejected" in p for p in _errors(tz, crd_dir))
    ttl = copy.deepcopy(doc)
    ttl["spec"]["jobTemplate"]["shutdownAfterJobFinishes"] = False
    assert any("jobTemplate: ttlSecondsAfterFinished" in p for p in _errors(ttl, crd_dir))


def test_builtin_kinds_checked(crd_dir):
    docs = {d["kind"]: d for d in cluster.load_manifests(KUBERAY / "cronjob-fallback.yaml")}
    cron = copy.deepcopy(docs["CronJob"])
    del cron["spec"]["schedule"]
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["resources"].pop("requests")
    problems = _errors(cron, crd_dir)
    assert any("spec.schedule: required" in p for p in problems), problems
    assert any("resources.requests: missing cpu, memory" in p for p in problems), problems
    binding = copy.deepcopy(docs["RoleBinding"])
    del binding["roleRef"]
    assert any("roleRef.kind: required" in p for p in _errors(binding, crd_dir))
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"token": "x"}}
    assert any("never committed" in p for p in _errors(secret, crd_dir))
    # The RayJob inside the fallback's ConfigMap is validated like any RayJob.
    cm = copy.deepcopy(docs["ConfigMap"])
    cm["data"]["rayjob.yaml"] = cm["data"]["rayjob.yaml"].replace("shutdownAfterJobFinishes", "shutdownAfterJob")
    assert any("data.rayjob.yaml: RayJob/" in p and "'shutdownAfterJob' was unexpected" in p
               for p in _errors(cm, crd_dir))


def test_unknown_kind_and_bad_yaml(tmp_path, crd_dir):
    assert "is not one vidgen ships" in _errors({"kind": "Deployment", "metadata": {"name": "x"}}, crd_dir)[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [RayJob\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        cluster.load_manifests(bad)


def test_dockerfile_pins_versions_as_build_args():
    text = (ROOT / "cluster" / "docker" / "Dockerfile").read_text()
    assert "ARG RAY_VERSION" in text and "ARG VIDGEN_VERSION" in text
    assert "[gpu]" in text and "rayproject/ray:${RAY_VERSION}" in text
    readme = (ROOT / "cluster" / "README.md").read_text()
    assert "--runtime-env jobs/runtime_env.yaml" in readme and "--submission-id" in readme


def test_the_gpu_extra_holds_every_optional_package_a_gpu_worker_imports():
    """The cluster image installs vidgen[gpu]; a GPU-only package vidgen imports but the extra lacks makes its
    option (train.adam_8bit, model.attention=xformers) fail on every cluster."""
    import re
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    declared = {re.split(r"[<>=\[ ]", req, maxsplit=1)[0].lower() for req in extra}
    imported = set()
    for path in (ROOT / "vidgen").rglob("*.py"):
        imported |= set(re.findall(r"^\s*import (bitsandbytes|xformers)\b", path.read_text(), re.M))
    assert imported == {"bitsandbytes", "xformers"}, imported
    assert imported <= declared, f"imported by vidgen but missing from the gpu extra: {imported - declared}"
    text = (ROOT / "cluster" / "docker" / "Dockerfile").read_text()
    assert '".[gpu]"' in text and "import bitsandbytes, xformers" in text


# ------------------------------------------------------------------------------------------- the documented command


def _documented_command() -> list[str]:
    """The validation command cluster/README.md gives, as a user's clone runs it (no shared fixtures)."""
    text = (ROOT / "cluster" / "README.md").read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("python -m vidgen.cluster")]
    assert "shared" not in line
    return line.split()[1:]


def _run(args: list[str], cwd: Path):
    import subprocess
    import sys

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_readme_validation_command_works_from_a_clone():
    proc = _run(_documented_command(), ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("cluster/kuberay/rayjob-train.yaml: ok (1 document(s); KubeRay CRD schema not checked: "
                           "no --crds)\n")


def test_validation_command_with_crds_and_its_errors(tmp_path, crd_dir):
    args = _documented_command()
    ok = _run([*args, "--crds", str(crd_dir)], ROOT)
    assert ok.returncode == 0 and "KubeRay CRD schema checked" in ok.stdout, ok.stderr
    missing = _run([*args, "--crds", str(tmp_path / "nope")], ROOT)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == (f"vidgen.cluster: error: {tmp_path / 'nope' / 'ray.io_rayjobs.yaml'}: no such CRD "
                              "file; --crds wants the folder of KubeRay's CRDs (ray-operator/config/crd/bases/ of "
                              "github.com/ray-project/kuberay at your operator's version), or leave it out to skip "
                              "the schema check\n")
    doc = cluster.load_manifests(KUBERAY / "rayjob-train.yaml")[0]
    doc["spec"]["shutdownAfterJobFinish"] = True  # a typo only the schema sees
    bad = tmp_path / "rayjob.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert _run(["-m", "vidgen.cluster", str(bad), "--repo-root", str(ROOT)], ROOT).returncode == 0
    typo = _run(["-m", "vidgen.cluster", str(bad), "--repo-root", str(ROOT), "--crds", str(crd_dir)], ROOT)
    assert typo.returncode == 2 and typo.stderr.startswith(f"vidgen.cluster: error: {bad}: 1 problem(s):")
    assert "shutdownAfterJobFinish" in typo.stderr and "Traceback" not in typo.stderr
