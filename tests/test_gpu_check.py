"""benchmarks/gpu_check.py on tiny models on the CPU: every check runs, reports sane numbers, and the script
never imports what the borrowed GPU machine lacks (Ray, DeepSpeed, MLflow; PyAV and pyarrow too)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("svd_lora", "svd_lora_xt", "svd_full_temporal", "hotshot_temporal", "fifo_svd", "i3d_features")
TRAINING = ("svd_lora", "svd_lora_xt", "svd_full_temporal")  # vidgen plan predicts these (and hotshot, when able)


def positive(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_gpu_check_tiny_cpu(tmp_path):
    from vidgen.models.hotshot import model as hotshot

    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny ops: a second thread only fights the other tests for cores
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--flavor", "tiny", "--device", "cpu",
                           "--steps", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    report = json.loads(out.read_text())
    assert lines[-1] == report["summary"] and lines[:-1] == report["checks"]

    summary, records = report["summary"], {r["check"]: r for r in report["checks"]}
    assert sorted(records) == sorted(CHECKS)
    assert summary["forbidden_imports"] == []  # ray, deepspeed, mlflow
    assert summary["unneeded_imports"] == [], "vidgen.data (PyAV) or vidgen.feed (pyarrow) got imported"
    assert summary["all_ok"] and summary["flavor"] == "tiny" and summary["device"] == "cpu"

    for name, r in records.items():
        if name == "hotshot_temporal" and not hasattr(hotshot, "full_size_configs"):
            assert r["ok"] is None and r["skipped"].startswith("skipped: no full-size hotshot configs"), r
            continue
        assert r["ok"] is True, r
        for key in ("step_s", "flops", "tflops"):
            assert positive(r[key]), (name, key, r[key])
        assert len(r["steps_s"]) == 1 and all(positive(t) for t in r["steps_s"])
        assert r["peak_cuda_bytes"] is None and r["mfu"] is None  # no CUDA here, no bf16 peak to compare with
        if name in TRAINING or "planned_tensor_bytes" in r:
            assert positive(r["planned_bytes"]) and positive(r["planned_tensor_bytes"]), (name, r)
            assert r["flops_source"] == "vidgen.plan" and r["flops"] == r["plan_flops"]
            assert positive(r["flops_counted"]) and math.isfinite(r["loss"])
            assert "train.num_workers=1" in r["plan_overrides"] and "train.zero_stage=0" in r["plan_overrides"]

    # the full-size path of the GPU run (config, builder, recipe) on the meta device
    meta = records["svd_lora"]["full_size_meta_params"]
    assert meta["unet"] - meta["trainable"] == 1_524_623_082 and meta["image_encoder"] == 632_076_800  # SVD-XT + LoRA
    if hasattr(hotshot, "full_size_configs"):
        meta = records["hotshot_temporal"]["full_size_meta_params"]
        assert meta["unet"] > 2_567_463_684 and 0 < meta["trainable"] < meta["unet"]  # SDXL UNet + temporal layers
