"""`vidgen demo`: the whole system, small, on one machine, in one MLflow run.

synthetic clips -> Ray Data ingest -> tiny SVD fine-tune on 2 Ray Train workers under DeepSpeed ZeRO-2
-> FIFO generation of videos longer than the model's frame window -> FVD/KVD with a tiny I3D -> MLflow.
Every stage is the real one at a small size; `jobs/configs/demo.yaml` holds the same settings for running
the stages one by one.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from vidgen import storage
from vidgen.config import VidgenConfig, load_config
from vidgen.models import registry
from vidgen.ray_env import init_ray
from vidgen.runner import eval_job, generate_job, tracker_for, train_job

log = logging.getLogger(__name__)

# The demo's settings, as overrides of the defaults (kept equal to jobs/configs/demo.yaml by a test).
DEMO_OVERRIDES = [
    "run.name=demo",
    "data.layout=hotshot",
    "data.height=64",
    "data.width=64",
    "data.source_fps=8",
    "model.flavor=tiny",
    "model.num_frames=4",
    "train.num_workers=2",
    "train.zero_stage=2",
    "train.max_steps=8",
    "train.checkpoint_every=4",
    "train.lr=1e-4",
    "generate.sampler=fifo",
    "generate.num_frames=16",
    "generate.fifo.partitions=2",
    "generate.fifo.lookahead=true",
    "generate.min_guidance_scale=1.0",
    "generate.max_guidance_scale=1.0",
    "generate.height=64",
    "generate.width=64",
    "eval.num_frames=16",
    "eval.resolution=64",
    "eval.i3d_flavor=tiny",
]


@dataclass
class DemoSizes:
    videos: int = 12  # synthetic clips
    frames: int = 16  # frames per synthetic clip (FVD compares 16-frame clips)
    generated: int = 2  # videos to generate


@dataclass
class DemoSummary:
    first_loss: float
    last_loss: float
    steps: int
    videos: list[str]
    fvd: float
    kvd: float
    run_id: str | None
    ui_command: str
    seconds: float
    extra: dict = field(default_factory=dict)

    def text(self) -> str:
        lines = [
            f"vidgen demo finished in {self.seconds:.0f} s",
            f"  loss: first {self.first_loss:.4f} -> last {self.last_loss:.4f} over {self.steps} steps",
            f"  videos ({len(self.videos)}):",
            *[f"    {v}" for v in self.videos],
            f"  FVD (tiny random I3D, {self.extra.get('num_real')} real vs {self.extra.get('num_generated')} "
            f"generated clips): {self.fvd:.3f}   KVD: {self.kvd:.5f}",
            f"  MLflow run: {self.run_id}",
            f"  open it with: {self.ui_command}",
        ]
        return "\n".join(lines)


def demo_config(workdir: str, overrides: list[str] | None = None) -> VidgenConfig:
    workdir = str(Path(workdir).expanduser().resolve()) if not storage.is_remote(workdir) else workdir
    run_name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"  # a fresh name: never resume an older demo
    base = [*DEMO_OVERRIDES, f"run.workdir={workdir}", f"run.name={run_name}",
            f"data.source={storage.join(workdir, 'data')}"]
    cfg = load_config(None, base + list(overrides or []))
    family = registry.spec(cfg.model).demo_overrides  # e.g. the family's recipe and frame counts; the user's win
    return load_config(None, base + list(family) + list(overrides or [])) if family else cfg


def make_prompts(cfg: VidgenConfig, samples: list[str], n: int) -> list[dict]:
    """Conditioning images: the first frame of the first `n` real clips, with their prompts."""
    from PIL import Image  # lazy: heavy; vidgen.demo loads only fsspec

    from vidgen.data.decode import decode_image  # lazy: loads PIL
    from vidgen.data.layouts import list_samples

    rows = []
    for s in list_samples(cfg.data.source, cfg.data.layout)[:n]:
        frame = decode_image(storage.read_bytes(s.frame_uris[0]), s.frame_uris[0])
        uri = storage.join(cfg.run.workdir, "prompts", f"{Path(s.uri).name}.png")
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="PNG")
        storage.write_bytes(uri, buf.getvalue())
        rows.append({"image": uri, "prompt": s.prompt or "", "seed": len(rows), "id": Path(s.uri).name})
    storage.write_text(storage.join(cfg.run.workdir, "prompts.jsonl"),
                       "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_demo(workdir: str = "./work/demo", overrides: list[str] | None = None,
             sizes: DemoSizes | None = None) -> DemoSummary:
    from vidgen.data.synth import make_moving_shapes  # lazy: loads PIL

    t0 = time.perf_counter()
    sizes = sizes or DemoSizes()
    cfg = demo_config(workdir, overrides)
    stages = tqdm(total=5, desc="demo", unit="stage", dynamic_ncols=True)

    stages.set_description("demo: synthesize clips")
    samples = make_moving_shapes(cfg.data.source, sizes.videos, sizes.frames, cfg.data.height, cfg.data.width,
                                 seed=cfg.run.seed)
    stages.update()
    stages.set_description("demo: start Ray")
    init_ray(cfg)
    stages.update()

    with tracker_for(cfg) as tracker:
        tracker.log_config(cfg.to_dict())
        tracker.set_tags({"vidgen.job": "demo"})

        stages.set_description("demo: train (2 workers, ZeRO-2)")
        steps = tqdm(total=cfg.train.max_steps, desc="train", unit="step", leave=False, dynamic_ncols=True)

        def show(row: dict) -> None:
            steps.update(row["step"] - steps.n)
            steps.set_postfix(loss=f"{row['loss']:.4f}")

        train = train_job(cfg, tracker, progress=show)
        steps.close()
        stages.update()

        stages.set_description("demo: generate (FIFO)")
        cfg.generate.unet = train["export_dir"]
        rows = make_prompts(cfg, samples, sizes.generated)
        gen = generate_job(cfg, tracker, rows)
        stages.update()

        stages.set_description("demo: FVD")
        ev = eval_job(cfg, tracker, real=cfg.data.source, generated=gen["output_dir"])
        stages.update()
        stages.close()

        summary = DemoSummary(first_loss=train["first_loss"], last_loss=train["last_loss"], steps=train["steps"],
                              videos=gen["videos"], fvd=ev["fvd"], kvd=ev["kvd"], run_id=tracker.run_id,
                              ui_command=tracker.ui_command(), seconds=time.perf_counter() - t0,
                              extra={"num_real": ev["num_real"], "num_generated": ev["num_generated"]})
        tracker.log_metrics({"demo/seconds": summary.seconds})
    return summary
