"""model.attention (sdpa | xformers | eager) and gradient checkpointing, for both model families.

The loss of a recipe runs every part a backend touches (VAE encoder, image/text encoders, UNet forward and
backward), so the tests compare losses and gradients of one batch with one seed under each setting.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from vidgen.config import ModelConfig, TrainConfig
from vidgen.errors import ConfigError
from vidgen.models import attention
from vidgen.models.registry import build_recipe
from vidgen.models.svd import model as svd

FAMILIES = {  # recipe, model overrides, batch
    "svd": ("svd_full", {"family": "svd", "num_frames": 4}, {}),
    "hotshot": ("hotshot_temporal", {"family": "hotshot", "num_frames": 4}, {"prompt": ["a red car", "a dog"]}),
}


def _recipe(family: str, **model):
    name, base, _ = FAMILIES[family]
    return build_recipe(ModelConfig(**{**base, **model}), TrainConfig(recipe=name), 0)


def _batch(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (2, 4, 64, 64, 3), generator=g, dtype=torch.uint8)
    return {"frames": frames, "fps": torch.tensor([7.0, 7.0]), **FAMILIES[family][2]}


def _loss_and_grads(recipe, batch) -> tuple[float, torch.Tensor]:
    unet = recipe.unet
    unet.zero_grad(set_to_none=True)
    loss, _ = recipe.loss(batch, lambda *a, **k: unet(*a, return_dict=False, **k)[0],
                          torch.Generator().manual_seed(0))
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in recipe.trainable_parameters() if p.grad is not None])
    return loss.item(), grads


def _processors(module: torch.nn.Module) -> set[type]:
    return {type(m.processor) for m in module.modules() if isinstance(m, Attention)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sdpa_and_eager_agree_and_really_switch(family):
    sdpa, eager = _recipe(family), _recipe(family, attention="eager")
    for part in ("unet", "vae"):
        assert _processors(getattr(sdpa.model, part)) == {AttnProcessor2_0}, part
        assert _processors(getattr(eager.model, part)) == {AttnProcessor}, part
    assert sum(1 for m in eager.unet.modules() if isinstance(m, Attention)) >= 4  # spatial, temporal, cross
    encoder = eager.model.image_encoder if family == "svd" else eager.model.text.text_encoder
    assert encoder.config._attn_implementation == "eager"

    batch = _batch(family)
    loss_s, grad_s = _loss_and_grads(sdpa, batch)
    loss_e, grad_e = _loss_and_grads(eager, batch)
    assert loss_s == pytest.approx(loss_e, rel=1e-5)
    assert torch.allclose(grad_s, grad_e, rtol=1e-4, atol=1e-6), (grad_s - grad_e).abs().max()
    assert grad_s.abs().sum() > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradient_checkpointing_changes_nothing_but_memory(family):
    plain, ckpt = _recipe(family), _recipe(family)
    ckpt.unet.enable_gradient_checkpointing()
    assert ckpt.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    batch = _batch(family)
    loss_p, grad_p = _loss_and_grads(plain, batch)
    loss_c, grad_c = _loss_and_grads(ckpt, batch)
    assert loss_p == pytest.approx(loss_c, rel=1e-6)
    assert torch.allclose(grad_p, grad_c, rtol=1e-5, atol=1e-7)


def test_xformers_without_cuda_is_one_line():
    assert not torch.cuda.is_available()
    with pytest.raises(ConfigError) as e:
        svd.build("tiny", attention="xformers")
    assert str(e.value).startswith("model.attention=xformers: needs a CUDA GPU") and "\n" not in str(e.value)


def test_custom_processors_are_left_alone():
    model = svd.tiny(num_frames=4)

    class Custom(AttnProcessor2_0):
        pass

    layer = next(m for m in model.unet.modules() if isinstance(m, Attention))
    layer.set_processor(Custom())
    switched = attention.set_attention(model.unet, "eager")
    assert type(layer.processor) is Custom
    assert switched == sum(1 for m in model.unet.modules() if isinstance(m, Attention)) - 1
