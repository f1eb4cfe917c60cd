"""A model family defined entirely outside vidgen: registered on import, named by `model.family_module`.

Shapes: B batch, F frames, C=3 latent channels, H/W pixels, h/w latents (H/4, W/4).

The model is a few hundred parameters: a fixed 4x4 average-pool "VAE" (no weights) and a per-frame convolution
"UNet" conditioned on the EDM noise level. The recipe trains it with vidgen's EDM objective
(`vidgen.diffusion.objectives`), the pipeline generates with vidgen's samplers; every job reaches it only through
`FAMILY`, a `vidgen.models.base.FamilySpec`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import safetensors.torch
import torch
import torch.nn.functional as F

from vidgen import storage
from vidgen.diffusion.noise import randn
from vidgen.diffusion.objectives import append_dims, edm_denoised, edm_loss, edm_scalings, rand_log_normal
from vidgen.diffusion.samplers import base_sample
from vidgen.models import registry
from vidgen.models.base import FamilySpec

WEIGHTS = "toy.safetensors"
SCALE = 4  # pixels per latent


class ToyUNet(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.noise = torch.nn.Linear(1, 3)

    def forward(self, x_bfchw: torch.Tensor, c_noise_bf: torch.Tensor, return_dict: bool = True):
        """diffusers' calling convention (the training loop asks for a tuple: return_dict=False)."""
        b, f = x_bfchw.shape[:2]
        out = self.conv(x_bfchw.flatten(0, 1)).unflatten(0, (b, f))
        out = out + self.noise(c_noise_bf.reshape(b, f, 1))[..., None, None]
        return {"sample": out} if return_dict else (out,)


class ToyModel:
    vae_scale_factor = SCALE

    def __init__(self, seed: int = 0):
        self.unet = ToyUNet(seed)

    def to(self, device, dtype=None) -> ToyModel:
        self.unet.to(device=device, dtype=dtype)
        return self

    def set_attention(self, backend: str) -> ToyModel:
        return self  # no attention layers

    def encode(self, frames_bfhwc: torch.Tensor) -> torch.Tensor:
        """uint8 frames -> latents [B, F, 3, h, w] in [-1, 1]."""
        x = frames_bfhwc.permute(0, 1, 4, 2, 3).float() / 127.5 - 1
        return F.avg_pool2d(x.flatten(0, 1), SCALE).unflatten(0, x.shape[:2])

    def decode_video(self, latents_bfchw: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        b, f = latents_bfchw.shape[:2]
        return F.interpolate(latents_bfchw.flatten(0, 1), scale_factor=SCALE).unflatten(0, (b, f))


def build(model_cfg, seed: int = 0, dtype: torch.dtype | None = None, weights: str | None = None) -> ToyModel:
    """Random init from `seed`, or the UNet weights a training run exported (`weights`: a URI)."""
    model = ToyModel(seed).to("cpu", dtype)
    if weights:
        model.unet.load_state_dict(safetensors.torch.load(storage.read_bytes(weights)))
    return model


@dataclass
class ToyRecipe:
    model_cfg: object
    train_cfg: object
    seed: int = 0
    build: object = None

    ENCODED = ("latents",)
    OPTIONAL_COLUMNS = ()
    TRAIN_SECTIONS = ("edm",)
    EXPORT_NAME = "toy"
    checkpoint_trainable_only = False

    def __post_init__(self):
        self.model = (self.build or build)(self.model_cfg, self.seed)

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.unet

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.unet.parameters())

    def to(self, device) -> ToyRecipe:
        return self

    def deepspeed_overrides(self) -> dict:
        return {}

    def encoders(self) -> list[torch.nn.Module]:
        return []

    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"latents": self.model.encode(batch["frames"])}

    def loss(self, batch: dict, unet_fn, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        e = self.train_cfg.edm
        x0 = batch["latents"] if "latents" in batch else self.encode(batch)["latents"]
        b, f = x0.shape[:2]
        sigma = rand_log_normal((b,), e.p_mean, e.p_std, generator)
        noisy = x0 + append_dims(sigma, x0.ndim) * randn(x0.shape, generator, x0.device)
        sc = edm_scalings(sigma)
        out = unet_fn(append_dims(sc.c_in, x0.ndim) * noisy, sc.c_noise[:, None].expand(b, f))
        return edm_loss(edm_denoised(out, noisy, sigma), x0, sigma), {"sigma_mean": sigma.mean().item()}

    def export(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        self.unet.load_state_dict(state_dict)
        state = {k: v.contiguous() for k, v in self.unet.state_dict().items()}
        safetensors.torch.save_file(state, str(Path(out_dir) / WEIGHTS))

    def export_merged(self, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
        self.export(state_dict, out_dir)


class ToySigmas:
    """Karras-like descending sigmas from 20 to 0.02, then 0."""

    config = SimpleNamespace(timestep_spacing="linspace")

    def __init__(self):
        self.sigmas = None

    def set_timesteps(self, num_steps: int, device="cpu") -> None:
        s = torch.logspace(torch.log10(torch.tensor(20.0)), torch.log10(torch.tensor(0.02)), num_steps)
        self.sigmas = torch.cat([s, torch.zeros(1)])

    def __deepcopy__(self, memo):
        return copy.copy(self)


class ToyDenoiser:
    def __init__(self, model: ToyModel):
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.unet.parameters()).device

    @torch.no_grad()
    def __call__(self, latents_bfchw: torch.Tensor, sigma_bf: torch.Tensor, cond) -> torch.Tensor:
        sc = edm_scalings(sigma_bf)
        x_in = append_dims(sc.c_in, latents_bfchw.ndim) * latents_bfchw
        out = self.model.unet(x_in, sc.c_noise, return_dict=False)[0]
        return append_dims(sc.c_out, out.ndim) * out + append_dims(sc.c_skip, out.ndim) * latents_bfchw


@dataclass
class ToyPipeline:
    model: ToyModel
    denoiser: ToyDenoiser
    scheduler: ToySigmas

    def condition(self, row: dict, g, image_fn, generator):
        return None  # unconditional

    def frames(self, cond, indices: list[int]):
        return cond

    def latent_shape(self, g, window: int) -> tuple[int, ...]:
        return (1, window, 3, g.height // SCALE, g.width // SCALE)


def build_pipeline(model_cfg, g) -> ToyPipeline:
    weights = storage.join(g.unet, WEIGHTS) if g.unet else None
    model = build(model_cfg, weights=weights)
    return ToyPipeline(model, ToyDenoiser(model), ToySigmas())


def validation_video(model: ToyModel, prompt, validation: dict, num_steps: int, generator) -> torch.Tensor:
    shape = (1, validation["num_frames"], 3, validation["height"] // SCALE, validation["width"] // SCALE)
    latents = base_sample(ToyDenoiser(model), None, ToySigmas(), shape, num_steps, generator=generator)
    return model.decode_video(latents)[0]


FAMILY = FamilySpec(name="toy", conditioning="text", build=build, recipes={"toy_full": ToyRecipe},
                    build_pipeline=build_pipeline, validation_video=validation_video)

registry.register("toy", __name__, ("toy_full",))
