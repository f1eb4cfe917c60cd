"""Inception-I3D: tiny flavor, checkpoint layout of the published 400-class Kinetics weights, loading."""

from __future__ import annotations

import time

import pytest
import torch

from vidgen.errors import ConfigError, ModelError
from vidgen.models.i3d import I3D, I3DConfig, build_i3d, init_weights

# Representative keys of `i3d_pretrained_400.pt` (VideoGPT / TATS / cd-fvd) with their shapes,
# written out by hand from the reference layer table (piergiaj/pytorch-i3d, TF kinetics-i3d).
PUBLISHED_KEYS = {
    "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
    "Conv3d_1a_7x7.bn.weight": (64,),
    "Conv3d_1a_7x7.bn.bias": (64,),
    "Conv3d_1a_7x7.bn.running_mean": (64,),
    "Conv3d_1a_7x7.bn.running_var": (64,),
    "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
    "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
    "Mixed_3b.b0.conv3d.weight": (64, 192, 1, 1, 1),
    "Mixed_3b.b1a.conv3d.weight": (96, 192, 1, 1, 1),
    "Mixed_3b.b1b.conv3d.weight": (128, 96, 3, 3, 3),
    "Mixed_3b.b2a.conv3d.weight": (16, 192, 1, 1, 1),
    "Mixed_3b.b2b.conv3d.weight": (32, 16, 3, 3, 3),
    "Mixed_3b.b3b.conv3d.weight": (32, 192, 1, 1, 1),
    "Mixed_3c.b2b.bn.running_var": (96,),
    "Mixed_4b.b0.conv3d.weight": (192, 480, 1, 1, 1),
    "Mixed_4e.b1b.conv3d.weight": (288, 144, 3, 3, 3),
    "Mixed_4f.b3b.bn.running_mean": (128,),
    "Mixed_5b.b0.conv3d.weight": (256, 832, 1, 1, 1),
    "Mixed_5b.b2a.conv3d.weight": (32, 832, 1, 1, 1),
    "Mixed_5c.b1b.conv3d.weight": (384, 192, 3, 3, 3),
    "Mixed_5c.b3b.conv3d.weight": (128, 832, 1, 1, 1),
    "logits.conv3d.weight": (400, 1024, 1, 1, 1),
    "logits.conv3d.bias": (400,),
}
# Checked against an independent sum over the reference layer table: 3 stem units + 9 Inception
# blocks x 6 units (conv weight + BN scale + BN shift each) + logits (1024 x 400 + 400). Without
# the logits layer this is the "12.3M" usually quoted for I3D.
FULL_PARAMS = 12_697_264
FULL_ENTRIES = 287  # 57 BN units x 5 entries + logits weight and bias; no num_batches_tracked


def _clip(b: int = 2, t: int = 9, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, size, size, generator=g) * 2 - 1


def _full_state(seed: int) -> dict[str, torch.Tensor]:
    """A full-width state dict in the published format: random values, no num_batches_tracked."""
    torch.manual_seed(seed)
    model = I3D(I3DConfig())
    init_weights(model)
    for m in model.modules():  # non-trivial BN statistics, so loading them is visible in the output
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.1, 0.1)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_tiny_builds_fast_and_gives_400_logits():
    start = time.perf_counter()
    model = build_i3d("tiny", seed=0)
    assert time.perf_counter() - start < 2.0
    assert not model.training
    with torch.no_grad():
        y = model(_clip())
    assert y.shape == (2, 400) and y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert 0.1 < y.std() < 100  # variance-preserving init: O(1) logits, not vanishing
    assert not torch.allclose(y[0], y[1])  # depends on the input


@pytest.mark.parametrize("shape", [(1, 3, 16, 224, 224), (1, 3, 8, 64, 64), (1, 3, 1, 32, 48)])
def test_final_pool_adapts_to_small_inputs(shape):
    with torch.no_grad():
        y = build_i3d("tiny")(torch.zeros(shape))
    assert y.shape == (1, 400) and torch.isfinite(y).all()


def test_tiny_is_deterministic_per_seed():
    a, b, c = build_i3d("tiny", seed=3), build_i3d("tiny", seed=3), build_i3d("tiny", seed=4)
    x = _clip()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.allclose(a(x), c(x))
    rng_before = torch.random.get_rng_state()
    build_i3d("tiny", seed=5)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched


def test_full_width_matches_published_checkpoint_layout():
    with torch.device("meta"):
        model = I3D(I3DConfig())
    state = model.state_dict()
    for key, shape in PUBLISHED_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    entries = [k for k in state if not k.endswith("num_batches_tracked")]
    assert len(entries) == FULL_ENTRIES
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMS
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 57 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    # Only the logits conv has a bias, as in the checkpoint.
    assert [k for k in entries if k.endswith("conv3d.bias")] == ["logits.conv3d.bias"]


def test_pretrained_loads_published_format_and_reproduces_outputs(tmp_path):
    state = _full_state(seed=1)
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(state, path)
    reference = I3D(I3DConfig())
    reference.load_state_dict(state, strict=False)
    reference.eval()

    model = build_i3d("pretrained", str(path))
    assert not model.training
    x = _clip(b=1, t=9, size=64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_missing_weights_name_the_path_and_how_to_get_them(tmp_path):
    path = str(tmp_path / "nowhere" / "i3d_pretrained_400.pt")
    with pytest.raises(ModelError, match="never downloads") as err:
        build_i3d("pretrained", path)
    assert path in str(err.value) and "eval.i3d_path" in str(err.value)
    with pytest.raises(ModelError, match="eval.i3d_path"):
        build_i3d("pretrained", None)
    with pytest.raises(ConfigError, match="eval.i3d_flavor.*'huge'"):
        build_i3d("huge")  # type: ignore[arg-type]


def test_wrong_weights_are_refused_with_the_path(tmp_path):
    tiny = tmp_path / "tiny.pt"
    torch.save(build_i3d("tiny").state_dict(), tiny)
    with pytest.raises(ModelError, match="wrong shape") as err:
        build_i3d("pretrained", str(tiny))
    assert str(tiny) in str(err.value) and "Conv3d_1a_7x7" in str(err.value)

    state = _full_state(seed=0)
    del state["Mixed_5c.b3b.bn.running_var"]
    state["extra.weight"] = torch.zeros(1)
    partial = tmp_path / "partial.pt"
    torch.save(state, partial)
    with pytest.raises(ModelError, match="1 missing keys.*Mixed_5c.b3b.bn.running_var.*1 unexpected"):
        build_i3d("pretrained", str(partial))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="not a PyTorch state dict") as err:
        build_i3d("pretrained", str(garbage))
    assert str(garbage) in str(err.value)


def test_bn_eps_is_selectable_and_weights_have_a_digest(tmp_path, monkeypatch):
    from vidgen import storage
    from vidgen.models.i3d import weights_digest

    bns = [m for m in build_i3d("tiny", bn_eps=1e-5).modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert bns and all(m.eps == 1e-5 for m in bns)
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(_full_state(seed=2), path)
    model = build_i3d("pretrained", str(path), bn_eps=1e-5)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d))
    digest = weights_digest("pretrained", str(path))
    copy = tmp_path / "renamed.pt"
    copy.write_bytes(path.read_bytes())
    assert digest.startswith("sha256:") and weights_digest("pretrained", str(copy)) == digest
    reads, real_open, real_read = [], storage.open, storage.read_bytes
    monkeypatch.setattr(storage, "open", lambda uri, mode="rb": reads.append(uri) or real_open(uri, mode))
    monkeypatch.setattr(storage, "read_bytes", lambda uri: reads.append(uri) or real_read(uri))
    assert weights_digest("pretrained", str(path)) == digest and reads == []  # an eval asks twice: one read
    torch.save(_full_state(seed=3), copy)  # changed in place: read again
    assert weights_digest("pretrained", str(copy)) != digest and reads == [str(copy)]
    assert weights_digest("tiny", seed=1) != weights_digest("tiny", seed=2)
    with pytest.raises(ModelError, match="eval.i3d_path"):
        weights_digest("pretrained", str(tmp_path / "missing.pt"))
