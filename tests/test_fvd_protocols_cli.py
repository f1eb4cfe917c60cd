"""`vidgen eval fvd ... eval.protocol=cd-fvd --json` equals cd-fvd's `compute_fvd` on the same clips and I3D weights,
restated here: cd-fvd's I3D preprocessing (bilinear squash to 224 on 0..255, then 2x/255 - 1), its port's BatchNorm
epsilon (1e-5), StyleGAN-V's statistics (float64 sums, covariance / N) and scipy's sqrtm of the covariance product.
Full-size I3D with random weights saved as a state dict (the layout of cd-fvd's i3d_pretrained_400.pt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_fvd_protocols import fvd_reference

from vidgen.cli import main
from vidgen.data.synth import make_moving_shapes
from vidgen.models.i3d import build_i3d

FRAMES = 16  # eval.num_frames' default, cd-fvd's sequence_length


def folder_clips(root) -> np.ndarray:
    return np.stack([np.stack([np.asarray(Image.open(d / f"{t}.png").convert("RGB")) for t in range(FRAMES)])
                     for d in sorted(root.iterdir())])


def cdfvd_features(model, videos: np.ndarray) -> np.ndarray:
    b, t, h, w, _ = videos.shape
    x = torch.from_numpy(videos).float().permute(0, 1, 4, 2, 3).reshape(b * t, 3, h, w)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False) * 2 / 255 - 1
    with torch.inference_mode():
        return model(x.reshape(b, t, 3, 224, 224).permute(0, 2, 1, 3, 4).contiguous()).numpy()


@pytest.mark.ray
@pytest.mark.slow
def test_cd_fvd_preset_equals_cd_fvds_compute_fvd(ray_session, tmp_path, capfd):
    real, fake = tmp_path / "real", tmp_path / "fake"
    make_moving_shapes(str(real), 4, FRAMES, 40, 56, seed=0)  # frame folders: lossless, read alike by both
    make_moving_shapes(str(fake), 3, FRAMES, 48, 48, seed=1)
    weights = tmp_path / "i3d_pretrained_400.pt"
    torch.save(_full_random_state(), weights)
    argv = ["eval", "fvd", "--real", str(real), "--fake", str(fake), "--fake-layout", "hotshot", "--i3d-weights",
            str(weights), "--json", "eval.protocol=cd-fvd", f"run.workdir={tmp_path / 'work'}"]
    assert main(argv) == 0
    out = json.loads(capfd.readouterr().out)
    assert out["params"]["fvd.protocol"] == "cd-fvd" and (out["n_real"], out["n_fake"]) == (4, 3)

    model = build_i3d("pretrained", str(weights), bn_eps=1e-5)
    # cd-fvd's statistics are StyleGAN-V's FeatureStats, restated in test_fvd_protocols
    expected = fvd_reference(cdfvd_features(model, folder_clips(real)), cdfvd_features(model, folder_clips(fake)),
                             "cd-fvd")
    assert out["fvd"] == pytest.approx(expected, rel=1e-5)
    assert out["fvd_lo"] is None and any("no bootstrap interval" in w for w in out["warnings"])  # 4 clips, 400-d


def _full_random_state() -> dict:
    """A full-width I3D's random init, as a 400-class InceptionI3d state dict."""
    from vidgen.models.i3d import I3D, I3DConfig, init_weights

    torch.manual_seed(0)
    model = I3D(I3DConfig())
    init_weights(model)
    return model.state_dict()
