"""Offline checks for the cluster manifests in cluster/kuberay/ (shared/reference/operations.md 1.7, 1.8, 2.4).

A manifest with a misspelled field fails at 2 a.m. when the operator rejects it, so every manifest is checked
here, before it reaches a cluster:

1. the KubeRay kinds against the CRD's own v1 openAPIV3Schema, made strict the way kubeconform's `-strict`
   does it (`additionalProperties: false` on every object that lists `properties`);
2. the controller rules the schema does not carry (name lengths, ttl needs shutdown, min <= max replicas,
   a cluster spec or selector, ...), mirrored from KubeRay's `controllers/ray/utils/validation.go`;
3. vidgen's own rules: runtimeEnvYAML parses, each entrypoint runs an existing script with a config that
   `vidgen.config.load_config` accepts, Ray token auth is on, and credentials appear only as secret references;
4. the built-in kinds (CronJob, ServiceAccount, Role, RoleBinding, ConfigMap) structurally: required fields,
   no privileged containers, requests and limits on every container.

Each check returns a list of problems ("<where>: <field>: <what was expected>"); `validate_file` raises one
`ConfigError` listing all of them. From a shell (check 1 only with --crds, the folder of KubeRay's CRD files):

    python -m vidgen.cluster cluster/kuberay/rayjob-train.yaml [more.yaml ...] [--crds DIR]
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from vidgen.config import load_config
from vidgen.errors import ConfigError, VidgenError
from vidgen.redact import SECRET_ENV  # names that carry credentials: from a Secret, never a literal

CRD_SOURCE = "ray-operator/config/crd/bases/ of github.com/ray-project/kuberay at your operator's version"

CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
# The controller refuses longer names: it derives Service and Pod names from them (validation.go).
NAME_LIMITS = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36, "RayService": 47}
# generateName gets 5 random characters appended by the API server.
GENERATED_SUFFIX = 5
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
BUILTIN_KINDS = {"CronJob", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret"}
# Literal credentials in any string: AWS access key ids, and long hex/base64 blobs such as Ray tokens.
SECRET_VALUE = re.compile(r"AKIA[0-9A-Z]{16}|\b[0-9a-f]{32,}\b|\b[A-Za-z0-9+/]{40,}={0,2}")
SCRIPT_PREFIXES = ("python", "python3")


# ------------------------------------------------------------------------------------------- loading


def load_manifests(path: str | Path) -> list[dict[str, Any]]:
    """All documents of a (multi-document) YAML file; empty documents are dropped."""
    try:
        docs = list(yaml.safe_load_all(Path(path).read_text()))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read manifest ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    bad = [i for i, d in enumerate(docs) if d is not None and not isinstance(d, dict)]
    if bad:
        raise ConfigError(f"{path}: document {bad[0] + 1}: expected a mapping with apiVersion and kind")
    return [d for d in docs if d]


def _make_strict(node: Any) -> Any:
    """Copy of an OpenAPI schema with `additionalProperties: false` wherever `properties` is listed."""
    if isinstance(node, list):
        return [_make_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _make_strict(v) for k, v in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=8)
def strict_schema(crd_path: str, version: str = "v1") -> dict[str, Any]:
    """The strict openAPIV3Schema of one version of a CRD file (cached: the files are ~1 MB each)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 1.5 s instead of ~15 s a file
    try:
        with open(crd_path) as f:
            crd = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    except FileNotFoundError:
        raise ConfigError(f"{crd_path}: no such CRD file; --crds wants the folder of KubeRay's CRDs ({CRD_SOURCE}), "
                          "or leave it out to skip the schema check") from None
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return _make_strict(v["schema"]["openAPIV3Schema"])
    raise ConfigError(f"{crd_path}: no version {version!r} in spec.versions")


# ------------------------------------------------------------------------------------------- schema


def _where(m: dict[str, Any]) -> str:
    meta = m.get("metadata") or {}
    return f"{m.get('kind', '?')}/{meta.get('name') or meta.get('generateName') or '?'}"


def _path(parts: Any) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def schema_errors(manifest: dict[str, Any], crd_dir: str | Path | None) -> list[str]:
    """Problems of a KubeRay manifest against its CRD (strict). Empty for kinds that are not KubeRay's, and
    without `crd_dir` (the schema check is skipped)."""
    kind = manifest.get("kind")
    if kind not in CRD_FILES or crd_dir is None:
        return []
    try:
        import jsonschema  # lazy: optional (the test extra)
    except ImportError:
        raise ConfigError("--crds: the schema check needs jsonschema (pip install jsonschema)") from None
    api = manifest.get("apiVersion")
    if api != "ray.io/v1":
        return [f"{_where(manifest)}: apiVersion: expected 'ray.io/v1', got {api!r}"]
    schema = strict_schema(str(Path(crd_dir) / CRD_FILES[kind]))
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    return [f"{_where(manifest)}: {_path(e.absolute_path)}: {e.message}" for e in errors]


# ------------------------------------------------------------------------------------------- controller


def _name_errors(manifest: dict[str, Any], limit: int) -> list[str]:
    meta = manifest.get("metadata") or {}
    where = _where(manifest)
    if meta.get("name"):
        name, room, field = meta["name"], limit, "metadata.name"
    elif meta.get("generateName"):
        name, room, field = meta["generateName"].rstrip("-"), limit - GENERATED_SUFFIX, "metadata.generateName"
    else:
        return [f"{where}: metadata.name: required"]
    out = []
    if len(name) > room:
        out.append(f"{where}: {field}: {len(name)} characters, at most {room} allowed for a "
                   f"{manifest.get('kind')}")
    if not DNS_1035.match(name):
        out.append(f"{where}: {field}: {name!r} is not a DNS-1035 label (lower-case letters, digits and '-', "
                   "starting with a letter)")
    return out


def _cluster_spec_errors(spec: dict[str, Any], where: str) -> list[str]:
    out = []
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            out.append(f"{where}: workerGroupSpecs[{i}] ({g.get('groupName')}): minReplicas {lo} > "
                       f"maxReplicas {hi}")
    autoscaler = spec.get("autoscalerOptions") or {}
    if spec.get("enableInTreeAutoscaling") and autoscaler.get("version") == "v2":
        pods = [spec.get("headGroupSpec") or {}, *(spec.get("workerGroupSpecs") or [])]
        for p in pods:
            policy = ((p.get("template") or {}).get("spec") or {}).get("restartPolicy")
            if policy not in (None, "Never"):
                out.append(f"{where}: restartPolicy: autoscaler v2 requires Never or unset, got {policy!r}")
    return out + _auth_errors(spec, where)


def _ray_containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    groups = [("headGroupSpec", spec.get("headGroupSpec") or {})]
    groups += [(f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    for label, g in groups:
        containers = ((g.get("template") or {}).get("spec") or {}).get("containers") or []
        if containers:  # KubeRay runs Ray in the first container
            yield label, containers[0]


def _auth_errors(spec: dict[str, Any], where: str) -> list[str]:
    """Secure by default: token auth from authOptions (KubeRay >= 1.6 makes the Secret) or from a Secret."""
    if (spec.get("authOptions") or {}).get("mode") == "token":
        return []
    out = []
    for label, c in _ray_containers(spec):
        env = {e.get("name"): e for e in c.get("env") or []}
        mode = (env.get("RAY_AUTH_MODE") or {}).get("value")
        token_ref = ((env.get("RAY_AUTH_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef")
        if mode != "token" or not token_ref:
            out.append(f"{where}: {label}: Ray token auth is off: set authOptions.mode=token, or env "
                       "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from a secretKeyRef")
    return out


def _job_spec_errors(spec: dict[str, Any], where: str) -> list[str]:
    out = []
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        out.append(f"{where}: spec: one of rayClusterSpec or clusterSelector is required")
    ttl = spec.get("ttlSecondsAfterFinished")
    if isinstance(ttl, int) and ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
        out.append(f"{where}: ttlSecondsAfterFinished: {ttl} > 0 requires shutdownAfterJobFinishes: true")
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules")
    if spec.get("shutdownAfterJobFinishes") and rules:
        out.append(f"{where}: deletionStrategy.deletionRules: not allowed together with "
                   "shutdownAfterJobFinishes")
    cluster = spec.get("rayClusterSpec") or {}
    if cluster.get("enableInTreeAutoscaling") and any(r.get("policy") == "DeleteWorkers" for r in rules or []):
        out.append(f"{where}: deletionRules: DeleteWorkers is not allowed when autoscaling is on")
    if spec.get("submissionMode") == "SidecarMode" and spec.get("submitterPodTemplate"):
        out.append(f"{where}: submitterPodTemplate: not allowed with submissionMode SidecarMode")
    if cluster:
        out += _cluster_spec_errors(cluster, f"{where}: rayClusterSpec")
    return out


def controller_errors(manifest: dict[str, Any]) -> list[str]:
    """The KubeRay controller's rules that the CRD schema does not enforce (operations.md 1.7)."""
    kind, spec, where = manifest.get("kind"), manifest.get("spec") or {}, _where(manifest)
    if kind not in NAME_LIMITS:
        return []
    out = _name_errors(manifest, NAME_LIMITS[kind])
    if kind == "RayCluster":
        out += _cluster_spec_errors(spec, where)
    elif kind == "RayJob":
        out += _job_spec_errors(spec, where)
    elif kind == "RayCronJob":
        if str(spec.get("schedule", "")).startswith(("TZ=", "CRON_TZ=")):
            out.append(f"{where}: schedule: TZ/CRON_TZ prefixes are rejected; use spec.timeZone")
        out += _job_spec_errors(spec.get("jobTemplate") or {}, f"{where}: jobTemplate")
    return out


# ------------------------------------------------------------------------------------------- vidgen rules


def _job_specs(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec, where = manifest.get("spec") or {}, _where(manifest)
    if manifest.get("kind") == "RayJob":
        yield where, spec
    elif manifest.get("kind") == "RayCronJob":
        yield f"{where}: jobTemplate", spec.get("jobTemplate") or {}


def entrypoint_errors(entrypoint: str, repo_root: str | Path, where: str = "entrypoint") -> list[str]:
    """`python SCRIPT --config CONFIG [key=value ...]`: SCRIPT exists and CONFIG + overrides load."""
    try:
        argv = shlex.split(entrypoint)
    except ValueError as e:
        return [f"{where}: entrypoint: cannot be split into arguments ({e})"]
    if len(argv) < 2 or Path(argv[0]).name not in SCRIPT_PREFIXES:
        return [f"{where}: entrypoint: expected 'python jobs/<script>.py --config <config> ...', got {entrypoint!r}"]
    root, script, rest = Path(repo_root), argv[1], argv[2:]
    if not (root / script).is_file():
        return [f"{where}: entrypoint: script {script!r} does not exist under {root}"]
    if "--config" not in rest or rest.index("--config") + 1 >= len(rest):
        return [f"{where}: entrypoint: no '--config <file>' after {script}"]
    i = rest.index("--config")
    config, overrides = rest[i + 1], rest[:i] + rest[i + 2:]
    if not (root / config).is_file():
        return [f"{where}: entrypoint: config {config!r} does not exist under {root}"]
    try:
        load_config(root / config, [o for o in overrides if "=" in o])
    except VidgenError as e:
        return [f"{where}: entrypoint: {e}"]
    return []


def runtime_env_errors(text: Any, where: str) -> list[str]:
    """runtimeEnvYAML is an opaque string to the CRD: it must parse to a mapping Ray accepts."""
    if not isinstance(text, str):
        return [f"{where}: runtimeEnvYAML: expected a YAML string, got {type(text).__name__}"]
    try:
        env = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{where}: runtimeEnvYAML: not valid YAML: {e}"]
    return runtime_env_dict_errors(env, f"{where}: runtimeEnvYAML", "set them on the pods from a Secret")


def runtime_env_dict_errors(env: Any, where: str, instead: str) -> list[str]:
    """A runtime env Ray accepts and that holds no credentials: Ray writes every runtime env in plain text to
    runtime_env_agent.log, keeps it in the GCS and shows it in the dashboard. `instead` says where they go."""
    if not isinstance(env, dict):
        return [f"{where}: expected a mapping (working_dir, env_vars, ...), got {type(env).__name__}"]
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        return [f"{where}: env_vars: expected a mapping of names to strings, got {type(env_vars).__name__}"]
    out = []
    for k, v in env_vars.items():
        if not isinstance(v, str):  # Ray's own rule: env_vars are Dict[str, str]
            out.append(f"{where}: env_vars.{k}: values must be strings, got {type(v).__name__}")
        if SECRET_ENV.search(str(k)):
            out.append(f"{where}: env_vars.{k}: credentials do not belong in a runtime env (Ray logs it in plain "
                       f"text); {instead}")
    return out


def vidgen_errors(manifest: dict[str, Any], repo_root: str | Path) -> list[str]:
    out = []
    for where, spec in _job_specs(manifest):
        if "runtimeEnvYAML" in spec:
            out += runtime_env_errors(spec["runtimeEnvYAML"], where)
        if spec.get("entrypoint"):
            out += entrypoint_errors(spec["entrypoint"], repo_root, where)
    return out


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


def secret_errors(manifest: dict[str, Any]) -> list[str]:
    """Credentials only by reference: no Secret objects with data, no literal token-like values."""
    where = _where(manifest)
    if manifest.get("kind") == "Secret" and (manifest.get("data") or manifest.get("stringData")):
        return [f"{where}: data: Secrets are created outside the repository (kubectl create secret), "
                "never committed"]
    out = []
    for path, value in _walk(manifest):
        if path.endswith(".value") and isinstance(value, str):
            name = _env_name(manifest, path)
            if name and SECRET_ENV.search(name) and name != "RAY_AUTH_MODE":
                out.append(f"{where}: {path}: {name} is a credential: use valueFrom.secretKeyRef")
        if isinstance(value, str) and SECRET_VALUE.search(value):
            out.append(f"{where}: {path}: looks like a literal credential; reference a Secret instead")
    return out


def _env_name(manifest: dict[str, Any], value_path: str) -> str | None:
    """The `name` beside an env entry's `value`, found by walking the same path."""
    node: Any = manifest
    for part in re.findall(r"[^.\[\]]+", value_path.removesuffix(".value")):
        node = node[int(part)] if isinstance(node, list) else node.get(part) if isinstance(node, dict) else None
        if node is None:
            return None
    return node.get("name") if isinstance(node, dict) else None


# ------------------------------------------------------------------------------------------- built-in kinds


def _pod_containers(manifest: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every container of every pod template in a manifest (KubeRay kinds included)."""
    def visit(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("containers", "initContainers") and isinstance(v, list):
                    for i, c in enumerate(v):
                        yield f"{path}.{k}[{i}]", c
                else:
                    yield from visit(v, f"{path}.{k}" if path else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from visit(v, f"{path}[{i}]")
    yield from visit(manifest.get("spec") or {}, "spec")


def container_errors(manifest: dict[str, Any]) -> list[str]:
    """No privileged containers; requests and limits (cpu, memory) on every container."""
    out, where = [], _where(manifest)
    for path, c in _pod_containers(manifest):
        if (c.get("securityContext") or {}).get("privileged"):
            out.append(f"{where}: {path}.securityContext.privileged: must not be true")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            missing = [r for r in ("cpu", "memory") if r not in (res.get(part) or {})]
            if missing:
                out.append(f"{where}: {path}.resources.{part}: missing {', '.join(missing)}")
    return out


_REQUIRED = {
    "CronJob": ("batch/v1", ["spec.schedule", "spec.jobTemplate.spec.template.spec.containers"]),
    "ServiceAccount": ("v1", []),
    "Role": ("rbac.authorization.k8s.io/v1", ["rules"]),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", ["roleRef.kind", "roleRef.name", "subjects"]),
    "ConfigMap": ("v1", []),
    "Secret": ("v1", []),
}


def builtin_errors(manifest: dict[str, Any]) -> list[str]:
    """Structural checks of the built-in kinds (kubernetes-validate is not a dependency)."""
    kind, where = manifest.get("kind"), _where(manifest)
    if kind not in _REQUIRED:
        return []
    api, fields = _REQUIRED[kind]
    out = [] if manifest.get("apiVersion") == api else [f"{where}: apiVersion: expected {api!r}"]
    out += _name_errors(manifest, 253) if kind != "CronJob" else _name_errors(manifest, 52)  # CronJob: 52
    for dotted in fields:
        node: Any = manifest
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not node:
            out.append(f"{where}: {dotted}: required")
    if kind == "CronJob":
        policy = ((((manifest.get("spec") or {}).get("jobTemplate") or {}).get("spec") or {}).get("template")
                  or {}).get("spec", {}).get("restartPolicy")
        if policy not in ("Never", "OnFailure"):
            out.append(f"{where}: spec.jobTemplate.spec.template.spec.restartPolicy: expected Never or "
                       f"OnFailure, got {policy!r}")
    return out


# ------------------------------------------------------------------------------------------- entry points


def manifest_errors(manifest: dict[str, Any], crd_dir: str | Path | None, repo_root: str | Path) -> list[str]:
    """Every problem of one manifest document; embedded RayJob templates (ConfigMaps) are checked too."""
    kind = manifest.get("kind")
    if kind not in CRD_FILES and kind not in BUILTIN_KINDS:
        return [f"{_where(manifest)}: kind: {kind!r} is not one vidgen ships ({sorted(CRD_FILES)} or "
                f"{sorted(BUILTIN_KINDS)})"]
    out = schema_errors(manifest, crd_dir) + controller_errors(manifest) + vidgen_errors(manifest, repo_root)
    out += secret_errors(manifest) + container_errors(manifest) + builtin_errors(manifest)
    if kind == "ConfigMap":  # the CronJob fallback keeps its RayJob here
        for key, text in (manifest.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                for doc in yaml.safe_load_all(text):
                    if doc:
                        out += [f"{_where(manifest)}: data.{key}: {p}"
                                for p in manifest_errors(doc, crd_dir, repo_root)]
    return out


def validate_file(path: str | Path, crd_dir: str | Path | None = None,
                  repo_root: str | Path = ".") -> list[dict[str, Any]]:
    """Load and check one manifest file; raise ConfigError listing every problem, else return its documents.
    Without `crd_dir` every check but the CRD schema runs."""
    docs = load_manifests(path)
    problems = [p for d in docs for p in manifest_errors(d, crd_dir, repo_root)]
    if problems:
        raise ConfigError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidgen.cluster", description="Check cluster manifests offline.")
    p.add_argument("manifests", nargs="+", metavar="MANIFEST", help="YAML files (cluster/kuberay/*.yaml)")
    p.add_argument("--crds", metavar="DIR", help=f"KubeRay's CRD files, for the strict schema check ({CRD_SOURCE})")
    p.add_argument("--repo-root", default=".", metavar="DIR", help="the checkout entrypoints run from (default: .)")
    args = p.parse_args(argv)
    schema = "checked" if args.crds else "not checked: no --crds"
    try:
        for path in args.manifests:
            docs = validate_file(path, args.crds, args.repo_root)
            print(f"{path}: ok ({len(docs)} document(s); KubeRay CRD schema {schema})")
    except VidgenError as e:
        print(f"vidgen.cluster: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
