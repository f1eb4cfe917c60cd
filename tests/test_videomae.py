"""VideoMAE-v2 features (eval.features=videomae, content-debiased FVD) against an independent restatement of
cd-fvd's model code (songweige/content-debiased-fvd `cdfvd/third_party/VideoMAEv2/videomaev2_finetune.py`,
`utils.py`): [0, 1] input squashed to 224 by bilinear resize on each clip as a 4-D tensor, tubelet embedding,
the fixed sinusoid table (stretched in time for other frame counts), pre-norm blocks with q/v-only qkv biases,
exact GELU, LayerNorm eps 1e-6, the layer-normed token mean. Written here with explicit matrix products."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidgen.errors import ModelError
from vidgen.eval.features import extract_features
from vidgen.models.videomae import FULL, TINY, VideoMAEv2, build_videomae, read_checkpoint


def cdfvd_preprocess(videos: np.ndarray) -> torch.Tensor:
    """cd-fvd's preprocess_videomae: each clip [T, H, W, C] -> [C, T, H, W] / 255, resized as an image batch."""
    out = []
    for v in torch.from_numpy(videos):
        x = v.permute(3, 0, 1, 2).to(torch.float32) / 255
        out.append(F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))
    return torch.stack(out)


def sinusoid(n: int, d: int) -> np.ndarray:
    table = np.array([[p / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for p in range(n)])
    table[:, 0::2], table[:, 1::2] = np.sin(table[:, 0::2]), np.cos(table[:, 1::2])
    return table.astype(np.float32)


def positions(t_tokens: int, d: int) -> torch.Tensor:
    """The 8x16x16 table; for another length, linear in time at source (i + 0.5) / s - 0.5, s = (t + 0.1) / 8."""
    table = torch.from_numpy(sinusoid(8 * 256, d)).reshape(8, 256, d)
    if t_tokens == 8:
        return table.reshape(-1, d)
    s = (t_tokens + 0.1) / 8
    rows = []
    for i in range(t_tokens):
        src = max((i + 0.5) / s - 0.5, 0.0)
        lo = math.floor(src)
        hi, w = min(lo + 1, 7), src - lo
        rows.append((1 - w) * table[lo] + w * table[hi])
    return torch.stack(rows).reshape(-1, d)


def layer_norm(x, w, b):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-6) * w + b


def cdfvd_forward_features(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    b, _, t, _, _ = x.shape
    w = sd["patch_embed.proj.weight"]
    d = w.shape[0]
    patches = x.reshape(b, 3, t // 2, 2, 16, 14, 16, 14).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, 3 * 2 * 14 * 14)
    h = patches @ w.reshape(d, -1).T + sd["patch_embed.proj.bias"] + positions(t // 2, d)
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        y = layer_norm(h, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        wq, wk, wv = sd[p + "attn.qkv.weight"].chunk(3)
        q = (y @ wq.T + sd[p + "attn.q_bias"]).reshape(b, -1, heads, d // heads).transpose(1, 2)
        k = (y @ wk.T).reshape(b, -1, heads, d // heads).transpose(1, 2)
        v = (y @ wv.T + sd[p + "attn.v_bias"]).reshape(b, -1, heads, d // heads).transpose(1, 2)
        attn = torch.softmax(q * (d // heads) ** -0.5 @ k.transpose(-1, -2), dim=-1)
        h = h + (attn @ v).transpose(1, 2).reshape(b, -1, d) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = layer_norm(h, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        y = y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        h = h + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        i += 1
    return layer_norm(h.mean(1), sd["fc_norm.weight"], sd["fc_norm.bias"])


@pytest.mark.parametrize("frames, size", [(16, (40, 56)), (8, (48, 48)), (12, (224, 224))])
def test_tiny_videomae_features_equal_cd_fvds_model_code(frames, size):
    videos = np.random.default_rng(frames).integers(0, 256, (3, frames, *size, 3), dtype=np.uint8)
    model = build_videomae("tiny", seed=3)
    ours = extract_features(model, videos, 224, batch_size=2, mode="squash", unit=True)
    with torch.inference_mode():
        ref = cdfvd_forward_features(model.state_dict(), cdfvd_preprocess(videos), TINY.heads).numpy()
    assert ours.shape == (3, TINY.dim)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(ours[0] - ours[1]).max() > 1e-2  # the features depend on the clip


def test_full_size_key_set_is_the_published_checkpoints():
    with torch.device("meta"):
        sd = VideoMAEv2(FULL).state_dict()
    assert len(sd) == 526 and not any(k.startswith(("pos_embed", "norm.", "cls_token")) for k in sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["patch_embed.proj.weight"] == (1408, 3, 2, 14, 14)
    assert shapes["blocks.39.attn.qkv.weight"] == (4224, 1408) and "blocks.0.attn.qkv.bias" not in shapes
    assert shapes["blocks.0.attn.q_bias"] == shapes["blocks.0.attn.v_bias"] == (1408,)
    assert shapes["blocks.0.mlp.fc1.weight"] == (6144, 1408) and shapes["head.weight"] == (174, 1408)
    d, m = 1408, 6144
    block = 3 * d * d + 2 * d + (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
    assert sum(math.prod(s) for s in shapes.values()) == 40 * block + (d * 1176 + d) + 2 * d + (174 * d + 174)


@pytest.mark.parametrize("wrap", ["model", "module", None])
def test_checkpoint_layouts_load_strictly(tmp_path, wrap):
    tiny = build_videomae("tiny", seed=1)
    path = tmp_path / "vit_g.pth"
    sd = tiny.state_dict()
    torch.save({wrap: sd, "epoch": 3} if wrap else sd, path)
    loaded = build_videomae("pretrained", str(path), config=TINY)
    x = torch.rand(1, 3, 4, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), tiny(x))


def test_damaged_checkpoints_fail_in_one_line_naming_the_field(tmp_path):
    sd = build_videomae("tiny").state_dict()
    bad = tmp_path / "bad.pth"
    torch.save({"model": {**sd, "blocks.1.mlp.fc1.weight": torch.zeros(3, 3)}}, bad)
    with pytest.raises(ModelError, match=r"eval\.videomae_path=.*bad\.pth: not VideoMAE-v2 ViT-g/14 weights: 1 keys "
                                         r"with the wrong shape \(e\.g\. blocks\.1\.mlp\.fc1\.weight"):
        build_videomae("pretrained", str(bad), config=TINY)
    torch.save({"model": {k: v for k, v in sd.items() if k != "fc_norm.bias"}}, bad)
    with pytest.raises(ModelError, match="1 missing keys"):
        build_videomae("pretrained", str(bad), config=TINY)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a PyTorch state dict") as e:
        read_checkpoint(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match="needs eval.videomae_path"):
        read_checkpoint(None)


def test_config_refuses_what_videomae_cannot_take():
    from vidgen.config import ConfigError, load_config

    for override, text in [("eval.resolution=128", "eval.resolution=128: eval.features=videomae takes 224"),
                           ("eval.videomae_flavor=pretrained", "eval.videomae_path: required"),
                           ("eval.protocol=stylegan-v", "StyleGAN-V's TorchScript I3D")]:
        with pytest.raises(ConfigError, match=text):
            load_config(None, ["eval.features=videomae", override])


@pytest.mark.ray
@pytest.mark.slow
def test_cd_fvd_videomae_cli_equals_cd_fvds_compute_fvd(ray_session, tmp_path, capfd):
    """`vidgen eval fvd ... eval.protocol=cd-fvd eval.features=videomae --json` equals cd-fvd's
    `cdfvd(model='videomae').compute_fvd` restated: its preprocessing, model code and StyleGAN-V statistics."""
    from test_fvd_protocols import fvd_reference
    from test_fvd_protocols_cli import FRAMES, folder_clips

    from vidgen.cli import main
    from vidgen.data.synth import make_moving_shapes

    real, fake, work = tmp_path / "real", tmp_path / "fake", tmp_path / "work"
    make_moving_shapes(str(real), 4, FRAMES, 40, 56, seed=0)
    make_moving_shapes(str(fake), 3, FRAMES, 48, 48, seed=1)
    common = ["eval", "fvd", "--real", str(real), "--fake", str(fake), "--fake-layout", "hotshot", "--json",
              "eval.protocol=cd-fvd", f"run.workdir={work}"]
    assert main([*common, "eval.features=videomae"]) == 0
    out = json.loads(capfd.readouterr().out)
    assert out["params"]["fvd.features"] == "videomae" and out["params"]["fvd.protocol"] == "cd-fvd"
    assert out["params"]["fvd.impl"].startswith("videomae-v2")

    model = build_videomae("tiny", seed=0)
    with torch.inference_mode():
        feats = [cdfvd_forward_features(model.state_dict(), cdfvd_preprocess(folder_clips(d)), TINY.heads).numpy()
                 for d in (real, fake)]
    assert out["fvd"] == pytest.approx(fvd_reference(feats[0], feats[1], "cd-fvd"), rel=1e-5)

    assert main(common) == 0  # I3D features: another metric, and its own real-set cache entry
    i3d = json.loads(capfd.readouterr().out)
    assert i3d["params"]["fvd.features"] == "i3d" and i3d["fvd"] != pytest.approx(out["fvd"], rel=1e-3)
    assert len(list((work / "eval-cache").glob("real-*.npz"))) == 2
