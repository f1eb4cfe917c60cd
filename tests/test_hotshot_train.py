"""Recipe hotshot_temporal on the real stack: ZeRO-2 on 2 CPU Ray workers, validation, export.

Killed workers and resumes of trainable-only checkpoints are proven in tests/faults and tests/test_lora.py."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

from vidgen.config import load_config
from vidgen.train.launch import fit


def clips(n: int = 4, frames: int = 3, size: int = 32):
    import ray

    rng = np.random.default_rng(0)
    # Prompts and SDXL micro-conditioning travel through Ray Train's batches as the clip reader writes them.
    return ray.data.from_items([{"frames": rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8),
                                 "fps": 8.0, "prompt": f"clip {i}", "orig_height": 2 * size, "orig_width": size,
                                 "crop_top": i, "crop_left": 0} for i in range(n)])


@pytest.mark.ray
def test_trains_and_exports_hotshot_weights(ray_session, tmp_path):
    from safetensors.torch import load_file

    from vidgen.data.video import read_video
    from vidgen.models.hotshot import model as hotshot
    from vidgen.models.hotshot import weights as hw

    cfg = load_config(None, [f"run.workdir={tmp_path}", f"run.name=hs-{uuid.uuid4().hex[:8]}",
                             "model.family=hotshot", "model.num_frames=3", "train.recipe=hotshot_temporal",
                             "train.num_workers=2", "train.zero_stage=2", "train.lr=1e-3", "train.max_steps=3",
                             "train.checkpoint_every=3", "train.ddpm.snr_gamma=5.0",
                             "train.ddpm.noise_offset=0.05", "train.ddpm.caption_dropout=0.1",
                             "train.activation_checkpointing=true", "train.validation_every=3",
                             "train.validation_steps=2", "data.height=32", "data.width=32", "data.fps=8"])
    logged: list[int] = []
    videos: list[str] = []
    result = fit(cfg, clips(), on_metrics=lambda rows: logged.extend(r["step"] for r in rows),
                 validation_images=["a red car"], on_artifacts=lambda step, paths: videos.extend(paths))
    assert logged == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in result.metrics)
    # validation: a text-to-video clip of the prompt with the weights being trained, logged by the driver
    assert len(videos) == 1 and videos[0].endswith("step00000003/00.mp4")
    assert read_video(videos[0])[0].shape == (3, 32, 32, 3)

    # the export is a Hotshot-XL unet/ directory plus the temporal-layer file; only temporal weights moved
    trained = hotshot.load_hotshot_unet_dir(result.export_dir)
    base = hotshot.tiny_unet(0)
    t, b = trained.state_dict(), base.state_dict()
    moved = {k for k in b if not torch.equal(t[k], b[k])}
    assert moved and all(".motion_modules." in k for k in moved)
    temporal = load_file(f"{result.export_dir}/{hw.TEMPORAL_FILE}")
    assert set(temporal) == set(hw.temporal_state_dict(base))
