"""The full-size architectures through the real stack on CPU: measured against `vidgen plan`.

Each run trains the full SVD-XT / Hotshot-XL architecture (random init from vidgen's built-in full-size configs,
`model.flavor=full`, seeded) at the smallest shape that still exercises every block (4 frames of 64x64 pixels:
8x8 latents, 1x1 at the deepest level), through what a user runs: `vidgen train`'s job on a local Ray cluster,
Ray Train workers, DeepSpeed ZeRO, the recipes, checkpoints, a worker killed and the run resumed, the export.

    python benchmarks/full_size.py [--runs svd_lora_zero2,svd_lora_zero3,svd_temporal,hotshot,generate]
                                   [--out benchmarks/out/full_size.json] [--workdir DIR]

Per run it prints one JSON line: build time, peak resident memory of each worker (its whole process tree,
sampled every 0.2 s), `vidgen plan`'s host prediction for the same config, step times, checkpoint size per rank
and save/load times, export size and time, and what was checked (resume step, stock-library loads). Frozen bases
run in bf16 (train.precision=bf16: the CPU runs bf16 matmuls at about twice fp32's speed here), trainable
parameters in fp32 with fp32 Adam states. A run the machine cannot hold says so with the plan's numbers instead
of starting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

GIB = 1024**3
SHAPE = ["model.num_frames=4", "data.height=64", "data.width=64"]
COMMON = ["model.flavor=full", "train.precision=bf16", "train.activation_checkpointing=true",
          "train.max_failures=1", "train.checkpoint_every=1", "train.lr=1e-4"]
RUNS = {
    # name: (overrides, kill a worker and resume, check the export with stock libraries)
    "svd_lora_zero2": (["train.recipe=svd_lora", "train.zero_stage=2", "train.max_steps=3",
                        "train.lora.export_merged=true"], True, "lora"),
    "svd_lora_zero3": (["train.recipe=svd_lora", "train.zero_stage=3", "train.max_steps=3",
                        "train.lora.export_merged=true"], True, "lora"),
    "svd_temporal": (["train.recipe=svd_full", "train.trainable=temporal", "train.zero_stage=3",
                      "train.offload_optimizer=true", "train.max_steps=2"], False, "unet"),
    "hotshot": (["model.family=hotshot", "train.recipe=hotshot_temporal", "train.zero_stage=3", "train.max_steps=2",
                 "model.num_frames=4"], False, "hotshot"),
}


# ---- memory of the Ray workers ----------------------------------------------------------------------------


class TreeSampler:
    """Peak RSS of every process whose command line names `marker` (Ray titles worker processes
    `ray::<Actor>.<method>`), each with its children, sampled every `period` seconds."""

    def __init__(self, markers: tuple[str, ...], period: float = 0.2):
        self.markers, self.period = markers, period
        self.peaks: dict[int, int] = {}
        self.labels: dict[int, str] = {}
        self.t0 = time.perf_counter()
        self.curve: dict[int, list[tuple[float, float]]] = {}  # pid -> (s since start, GiB), a point a second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.period):
            for p in psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    hit = next((m for m in self.markers if m in cmd), None)
                    if hit is None:
                        continue
                    rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                self.labels[p.pid] = hit
                self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), rss)
                now, curve = round(time.perf_counter() - self.t0, 1), self.curve.setdefault(p.pid, [])
                if not curve or now - curve[-1][0] >= 1:
                    curve.append((now, round(rss / GIB, 2)))
                elif rss / GIB > curve[-1][1]:  # the second's peak
                    curve[-1] = (curve[-1][0], round(rss / GIB, 2))

    def curve_of(self, marker: str) -> list[tuple[float, float]]:
        """The largest process's RSS curve, thinned to where it moved by 0.1 GiB or more."""
        pids = [k for k in self.peaks if self.labels[k] == marker]
        if not pids:
            return []
        out: list[tuple[float, float]] = []
        for point in self.curve[max(pids, key=self.peaks.get)]:
            if not out or abs(point[1] - out[-1][1]) >= 0.1:
                out.append(point)
        return out

    def peaks_of(self, marker: str) -> list[int]:
        return sorted((v for k, v in self.peaks.items() if self.labels[k] == marker), reverse=True)


def _gib(x: float | None) -> float | None:
    return None if x is None else round(x / GIB, 2)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


# ---- one training run ---------------------------------------------------------------------------------------


def planned_host(cfg) -> dict | None:
    try:
        from vidgen.plan import plan

        return plan(cfg).get("host")
    except Exception as e:  # the planner not covering a config is a finding too
        return {"error": f"{type(e).__name__}: {e}"}


def train_run(name: str, work: Path, data: str, out: dict) -> dict:
    from vidgen.runner import tracker_for, train_job
    from vidgen.train import loop

    overrides, kill, check = RUNS[name]
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    avail = _available_bytes()
    out |= {"run": name, "precision": "bf16 frozen bases, fp32 trainable + Adam", "overrides": overrides,
            "available_gib": _gib(avail)}
    for workers in (2, 1):  # 2 workers where the plan says they fit here, else 1, else the plan's numbers
        cfg = _config(name, work, data, workers)
        host = planned_host(cfg)
        per_worker = (host or {}).get("per_worker_bytes")
        need = per_worker * workers if per_worker else 0
        out |= {"workers": workers, "planned_worker_gib": _gib(per_worker), "plan_host": host}
        if need <= avail:
            break
        out.setdefault("does_not_fit", []).append(
            f"{workers} workers need {need / GIB:.1f} GiB by the plan ({per_worker / GIB:.2f} each); "
            f"{avail / GIB:.1f} GiB available")
    else:
        out["skipped"] = "; ".join(out.pop("does_not_fit"))
        return out

    dump = run_dir / "final_state.pt"
    marker = run_dir / "fault-marker"
    env = {loop.DUMP_ENV: str(dump)} if check == "lora" else {}
    if kill:  # rank 1 dies right after step 2, before its checkpoint: the restart resumes from step 1's
        env["VIDGEN_FAULT_TRAIN"] = f"{workers - 1}:2@{marker}"  # vidgen/faults.py
    os.environ.update(env)
    t0 = time.perf_counter()
    try:
        with TreeSampler(("RayTrainWorker", "_export_task")) as mem, tracker_for(cfg) as tracker:
            summary = train_job(cfg, tracker)
    finally:
        for k in env:
            os.environ.pop(k, None)
    wall = time.perf_counter() - t0
    workers = [x for x in mem.peaks_of("RayTrainWorker") if x > GIB // 2]  # training processes, not idle ones
    out |= {
        "wall_s": round(wall, 1), "steps": summary["steps"], "first_loss": summary["first_loss"],
        "last_loss": summary["last_loss"],
        "worker_peak_gib": [_gib(x) for x in workers],
        "export_task_peak_gib": _gib(max(mem.peaks_of("_export_task"), default=0)),
        "worker_rss_curve_s_gib": mem.curve_of("RayTrainWorker"),
        "measured_vs_planned": round(workers[0] / per_worker, 3) if workers and per_worker else None,
        "kill": marker.read_text().split() if marker.exists() else None,
        **_checkpoint_figures(Path(summary["checkpoint_dir"])),
        "export_dir": summary["export_dir"], "export_gib": _gib(_size(Path(summary["export_dir"]))),
    }
    out |= summary["timings"]
    if check == "lora":
        out["stock_load"] = check_lora_export(cfg, summary, dump)
    elif check == "hotshot":
        out["stock_load"] = check_hotshot_export(summary)
    return out


EXTRA: list[str] = []  # --set


def _config(name: str, work: Path, data: str, workers: int = 2):
    from vidgen.config import load_config

    return load_config(None, [f"run.workdir={work / name}", f"run.name={name}-{uuid.uuid4().hex[:6]}",
                              f"data.source={data}", *COMMON, *SHAPE, f"train.num_workers={workers}",
                              *RUNS[name][0], *EXTRA])


def _checkpoint_figures(ckpt: Path) -> dict:
    import re

    ranks: dict[str, int] = {}
    for f in ckpt.rglob("*"):
        if f.is_file():  # DeepSpeed's zero_pp_rank_<r>_... and vidgen's manifest-<r> files; the rest is shared
            m = re.search(r"(?:zero_pp_rank_|manifest\.)(\d+)", f.name)
            rank = m.group(1) if m else "shared"
            ranks[rank] = ranks.get(rank, 0) + f.stat().st_size
    return {"checkpoint_gib": _gib(_size(ckpt)), "checkpoint_files_by_rank_gib": {k: _gib(v) for k, v in ranks.items()}}


def _available_bytes() -> int:
    """The machine's memory less what the OS, the driver and Ray's own processes hold (~2.5 GiB measured here)."""
    import psutil

    return psutil.virtual_memory().total - int(2.5 * GIB)


# ---- exports, loaded without vidgen -------------------------------------------------------------------------


def _svd_inputs(config: dict, frames: int = 4):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, frames, config["in_channels"], 8, 8, generator=g)
    t = torch.tensor([0.7])
    enc = torch.randn(1, 1, config["cross_attention_dim"], generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]])
    return x, t, enc, ids


def check_lora_export(cfg, summary: dict, dump: Path) -> dict:
    """The trained UNet (rank 0's final state) against stock diffusers + PEFT reading the export, all evaluated in
    fp32: the base rebuilt from the merged export's config.json and the seed as `model.flavor=full` builds it
    (torch.manual_seed(seed), then from_config with bf16 as the default dtype), the adapters from
    adapter_model.safetensors; and the merged UNet directory through diffusers' `from_pretrained`."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    export, merged = Path(summary["export_dir"]), Path(summary["merged_dir"])
    config = json.loads((merged / "config.json").read_text())
    inputs = _svd_inputs(config)

    def forward(unet) -> torch.Tensor:
        with torch.no_grad():
            return unet.float().eval()(*inputs, return_dict=False)[0]

    t0 = time.perf_counter()
    torch.manual_seed(cfg.run.seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        unet = UNetSpatioTemporalConditionModel.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    inject_adapter_in_model(LoraConfig.from_pretrained(str(export)), unet)
    state = load_file(str(export / "adapter_model.safetensors"))
    loaded = set_peft_model_state_dict(unet, {k.removeprefix("base_model.model."): v for k, v in state.items()})
    stock = forward(unet)
    stock_s = time.perf_counter() - t0
    trained = torch.load(dump, map_location="cpu", weights_only=True)
    result = unet.load_state_dict(trained, strict=False)
    reference = forward(unet)
    del unet, trained
    merged_out = forward(UNetSpatioTemporalConditionModel.from_pretrained(str(merged)))
    scale = reference.abs().max().item()
    return {"peft_unexpected_keys": len(getattr(loaded, "unexpected_keys", []) or []),
            "trained_state_missing_keys": len(result.missing_keys),
            "stock_vs_trained_max_abs_over_max": float(f"{(stock - reference).abs().max().item() / scale:.2e}"),
            "merged_vs_trained_max_abs_over_max": float(f"{(merged_out - reference).abs().max().item() / scale:.2e}"),
            "stock_load_s": round(stock_s, 1)}


def hotshot_key_set(config: dict) -> set[str]:
    """The keys of Hotshot-XL's `hsxl_temporal_layers.safetensors` for a UNet config, written from Hotshot's own
    modules (`hotshot_xl/models/transformer_temporal.py`, `unet_blocks.py`), not from vidgen's converter: one
    TransformerTemporal after each resnet of every down block (layers_per_block) and up block (+1), none in the
    mid block; each holds GroupNorm `norm`, `proj_in`, one TransformerBlock (two bias-free q/k/v attentions with
    an output projection and a positional-encoding buffer, two LayerNorms `norms`, `ff_norm`, a GEGLU `ff`), and
    `proj_out`."""
    layers = config["layers_per_block"]
    layers = layers if isinstance(layers, int) else layers[0]
    block = "transformer_blocks.0."
    inner = ["norm.weight", "norm.bias", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias",
             *(f"{block}attention_blocks.{a}.{k}" for a in (0, 1) for k in (
                 "to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias",
                 "pos_encoder.positional_encoding")),
             *(f"{block}{n}.{w}" for n in ("norms.0", "norms.1", "ff_norm") for w in ("weight", "bias")),
             *(f"{block}ff.{n}.{w}" for n in ("net.0.proj", "net.2") for w in ("weight", "bias"))]
    blocks = len(config["down_block_types"])
    return {f"{kind}.{i}.temporal_attentions.{j}.{k}"
            for kind, per in (("down_blocks", layers), ("up_blocks", layers + 1))
            for i in range(blocks) for j in range(per) for k in inner}


def check_hotshot_export(summary: dict) -> dict:
    """The exported temporal-layer file against Hotshot's key set, then loaded back into the exported unet/
    directory's UNet (vidgen's strict loader: every key and shape) and compared tensor for tensor."""
    import torch
    from safetensors.torch import load_file

    from vidgen.models.hotshot import model as hotshot
    from vidgen.models.hotshot import weights as hw

    unet_dir = next(Path(summary["export_dir"]).rglob(hw.TEMPORAL_FILE)).parent
    config = json.loads((unet_dir / "config.json").read_text())
    state = load_file(str(unet_dir / hw.TEMPORAL_FILE))
    expected = hotshot_key_set(config)
    t0 = time.perf_counter()
    unet = hotshot.load_hotshot_unet_dir(unet_dir, temporal_layers=unet_dir / hw.TEMPORAL_FILE)
    back = hw.temporal_state_dict(unet)
    return {"file": str(unet_dir / hw.TEMPORAL_FILE), "keys": len(state), "hotshot_keys": len(expected),
            "equals_hotshot_key_set": set(state) == expected,
            "missing": sorted(expected - set(state))[:3], "unexpected": sorted(set(state) - expected)[:3],
            "loads_back_equal": set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items()),
            "load_s": round(time.perf_counter() - t0, 1)}


# ---- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join([*RUNS, "generate"]), help="comma-separated, from: "
                    + ", ".join([*RUNS, "generate"]))
    ap.add_argument("--out", default="benchmarks/out/full_size.json", help="all results as one JSON file")
    ap.add_argument("--workdir", default=None, help="where runs write (default: a temporary directory)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override added to every training run, after the run's own (repeatable)")
    ap.add_argument("--keep", action="store_true",
                    help="keep each run's checkpoints and exports (default: deleted once measured and checked)")
    ap.add_argument("--brief", action="store_true", help="leave the plan's whole host section out of the output")
    args = ap.parse_args()
    EXTRA.extend(args.set)

    import ray

    from vidgen.data.synth import make_moving_shapes
    from vidgen.ray_env import set_driver_env

    set_driver_env()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vidgen-full-"))
    data = str(work / "clips")
    if not Path(data).exists():
        make_moving_shapes(data, 8, 4, 64, 64, seed=0)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results = []
    for name in args.runs.split(","):
        t0, res = time.perf_counter(), {"run": name}
        try:
            res = generate_runs(work, data) if name == "generate" else train_run(name, work, data, res)
        except Exception as e:  # with what the run had recorded (workers, the plan's figures)
            text = str(e)
            if "out of memory" in text:  # Ray's memory monitor killed a worker: what the plan said, and that
                text = "did not fit: a worker was killed by Ray's memory monitor (node memory above 95%)"
            res["error"] = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
        finally:
            if not args.keep:  # checkpoints and exports of a full-size run take 3-16 GB of disk each
                shutil.rmtree(work / name, ignore_errors=True)
        if args.brief:
            res.pop("plan_host", None)
        res["total_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res), flush=True)
        results.append(res)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


def generate_runs(work: Path, data: str) -> dict:
    """One short FIFO video per family at 64x64 with 2 steps, through the generation job (Ray Data actors)."""
    from vidgen.config import load_config
    from vidgen.generate.job import run_generation

    out = {"run": "generate"}
    for family, extra in (("svd", []), ("hotshot", ["model.family=hotshot"])):
        root = work / f"gen-{family}"
        shutil.rmtree(root, ignore_errors=True)
        cfg = load_config(None, [f"run.workdir={root}", "model.flavor=full", "model.num_frames=4", *extra,
                                 "generate.sampler=fifo", "generate.num_frames=6", "generate.num_inference_steps=2",
                                 "generate.height=64", "generate.width=64", "generate.fifo.partitions=1"])
        rows = [{"image": str(next(Path(data).rglob("*.png"), "")) or None, "prompt": "a red square moves",
                 "seed": 0, "id": "p0"}]
        t0 = time.perf_counter()
        with TreeSampler(("MapWorker",)) as mem:
            res = run_generation(cfg, rows)
        out[family] = {"status": [r["status"] for r in res], "errors": [r.get("error") for r in res if r.get("error")],
                       "wall_s": round(time.perf_counter() - t0, 1),
                       "actor_peak_gib": [_gib(x) for x in mem.peaks_of("MapWorker")]}
    return out


if __name__ == "__main__":
    sys.exit(main())
