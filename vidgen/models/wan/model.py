"""Wan 2.x: diffusers' WanTransformer3DModel (a DiT), the causal 3-D Wan VAE and a UMT5 text encoder.

Shapes: B batch, F pixel frames, L latent frames ((F - 1) / 4 + 1), C latent channels, H/W pixels, h/w latents,
S text tokens, D text width.

Latents are the VAE posterior's mean normalised per channel, (mu - latents_mean) / latents_std (the VAE config's
statistics), as the original Wan code, DiffSynth-Studio and diffusers' WanPipeline use them. Text embeddings are
UMT5's last hidden states of the prompt's tokens, zero past each prompt's length, at `text_length` tokens (512 for
the published models), as WanPipeline pads them.

Image-to-video where the checkpoint has the image branch, in either of diffusers' two designs:
- Wan 2.2 TI2V-5B (`expand_timesteps`, the flag of its diffusers model_index.json) puts a first frame's latent in
  place of latent frame 0 and gives that frame's tokens timestep 0, so it stays clean while the others are
  denoised. The causal VAE encodes frame 0 on its own, so a clip's latent frame 0 is its first frame's latent.
- Wan 2.1 I2V (transformer in_channels = 2 * out_channels + 4, image_dim set) takes the image as extra input
  channels: 4 mask channels (1 on latent frame 0, the image's, 0 elsewhere) and the normalised VAE latents of the
  video [image, black frames...] (`encode_condition`), and CLIP's penultimate hidden states of the image
  (`encode_clip`, from image_encoder/ and image_processor/) through the transformer's image embedder.

Flavors: tiny (small configs after diffusers' own Wan tests, random init, seeded; a byte-level tokenizer that needs
no files; a model.path naming Wan2.2-TI2V-5B gives the tiny TI2V architecture), full (a published architecture,
random init: the one model.path's name says, e.g. Wan2.1-T2V-14B, else Wan2.1-T2V-1.3B), pretrained (a diffusers
Wan directory: transformer/, vae/, text_encoder/, tokenizer/, optionally scheduler/ for the sampling shift and
model_index.json for expand_timesteps; local or any URI).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import (
    BatchEncoding,
    CLIPVisionConfig,
    CLIPVisionModel,
    UMT5Config,
    UMT5EncoderModel,
)

from vidgen.errors import ModelError, brief
from vidgen.models import attention
from vidgen.models.attention import check_backend
from vidgen.models.loading import resolve_model_dir

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer")
CLIP_SUBFOLDERS = ("image_encoder", "image_processor")  # Wan 2.1 I2V's (transformer config image_dim set)
TEXT_LENGTH = 512  # WanPipeline's max_sequence_length
DEFAULT_SHIFT = 3.0  # WanPipeline's sampling flow_shift at 480p (5.0 at 720p), when scheduler/ does not say


class ByteTokenizer:
    """UTF-8 bytes as token ids (pad 0, eos 1, byte b -> b + 3), then eos: the tiny flavor's tokenizer, called as
    a transformers tokenizer is (padding to max_length, truncation, attention mask, return_tensors="pt")."""

    vocab_size = 259
    pad_token_id, eos_token_id = 0, 1

    def __init__(self, model_max_length: int = 32):
        self.model_max_length = model_max_length

    def __call__(self, text, max_length: int | None = None, **_) -> BatchEncoding:
        texts = [text] if isinstance(text, str) else list(text)
        n = max_length or self.model_max_length
        ids = torch.zeros(len(texts), n, dtype=torch.long)
        for i, t in enumerate(texts):
            row = [b + 3 for b in t.encode("utf-8")][: n - 1] + [self.eos_token_id]
            ids[i, : len(row)] = torch.tensor(row)
        return BatchEncoding({"input_ids": ids, "attention_mask": (ids != self.pad_token_id).long()})


@dataclass
class Wan:
    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: object
    text_length: int = TEXT_LENGTH
    flow_shift: float = DEFAULT_SHIFT  # the sampling schedule's shift (training has its own: train.flow.shift)
    expand_timesteps: bool = False  # TI2V: a first frame's latent is latent frame 0, held at timestep 0
    image_encoder: CLIPVisionModel | None = None  # Wan 2.1 I2V's CLIP (with image_processor)
    image_processor: object = None

    @property
    def image_channels(self) -> bool:
        """The image as extra input channels (Wan 2.1 I2V): in_channels = 2 * out_channels + 4."""
        return self.transformer.config.in_channels != self.transformer.config.out_channels

    @property
    def image_to_video(self) -> bool:
        return self.expand_timesteps or self.image_channels

    def frozen(self) -> list[torch.nn.Module]:
        """The encoders: VAE, UMT5 and, for Wan 2.1 I2V, CLIP."""
        return [self.vae, self.text_encoder] + ([self.image_encoder] if self.image_encoder is not None else [])

    @property
    def token_pixels(self) -> int:
        """Pixels per transformer token, spatially: VAE x patch (16 for Wan 2.1, 32 for TI2V-5B)."""
        return self.vae_scale_factor * int(self.transformer.config.patch_size[1])

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent, spatially (8; the Wan 2.2 VAE: 16)."""
        return int(self.vae.config.scale_factor_spatial)

    @property
    def temporal_factor(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_factor + 1

    def set_attention(self, backend: str) -> Wan:
        attention.apply(backend, [self.transformer, self.vae], self.frozen()[1:])
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Wan:
        for m in (self.transformer, *self.frozen()):
            m.to(device=device, dtype=dtype)
        return self

    def _mean_std(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel latent statistics, [1, 1, C, 1, 1], on `like`'s device, fp32."""
        c = self.vae.config
        mean = torch.tensor(c.latents_mean, dtype=torch.float32, device=like.device).view(1, 1, -1, 1, 1)
        std = torch.tensor(c.latents_std, dtype=torch.float32, device=like.device).view(1, 1, -1, 1, 1)
        return mean, std

    @torch.no_grad()
    def encode_video(self, frames_bfchw: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, L, C, h, w] (fp32) of frames in [-1, 1]: the posterior mean, deterministic."""
        x = frames_bfchw.permute(0, 2, 1, 3, 4).to(self.vae.dtype)  # [B, 3, F, H, W]
        mu = self.vae.encode(x).latent_dist.mean.float().permute(0, 2, 1, 3, 4)
        mean, std = self._mean_std(mu)
        return ((mu - mean) / std).contiguous()

    @torch.no_grad()
    def encode_image(self, image_bchw: torch.Tensor) -> torch.Tensor:
        """A first frame's normalised latent [B, C, h, w] (image in [-1, 1]): latent frame 0 of any clip it opens."""
        return self.encode_video(image_bchw[:, None])[:, 0]

    @torch.no_grad()
    def encode_condition(self, image_bchw: torch.Tensor, frames: int) -> torch.Tensor:
        """Wan 2.1 I2V's extra input channels [B, L, 4 + C, h, w] for a video of `frames` pixel frames opening on
        the image: the mask (ones on latent frame 0) and the normalised latents of [image, black frames...]."""
        video = torch.cat([image_bchw[:, None], image_bchw.new_zeros(image_bchw.shape[0], frames - 1,
                                                                    *image_bchw.shape[1:])], dim=1)
        latents = self.encode_video(video)  # [B, L, C, h, w]
        mask = torch.zeros_like(latents[:, :, :4])
        mask[:, 0] = 1
        return torch.cat([mask, latents], dim=2)

    @torch.no_grad()
    def encode_clip(self, image_bchw: torch.Tensor) -> torch.Tensor:
        """CLIP's penultimate hidden states [B, T, D] of the image (in [-1, 1]), through the image processor as
        diffusers' WanImageToVideoPipeline feeds it (uint8 pixels in)."""
        pixels = ((image_bchw.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        enc = self.image_processor(images=list(pixels), return_tensors="pt")
        device = next(self.image_encoder.parameters()).device
        x = enc["pixel_values"].to(device, self.image_encoder.dtype)
        return self.image_encoder(pixel_values=x, output_hidden_states=True).hidden_states[-2].float()

    @torch.no_grad()
    def decode_video(self, latents_blchw: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Frames in [-1, 1], [B, F, 3, H, W] with F = (L - 1) * 4 + 1 (the causal VAE decodes a clip whole)."""
        mean, std = self._mean_std(latents_blchw)
        z = (latents_blchw.float() * std + mean).permute(0, 2, 1, 3, 4).to(self.vae.dtype)
        return self.vae.decode(z).sample.float().permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings [B, S, D] (S = text_length), zero past each prompt's tokens (WanPipeline's layout)."""
        device = next(self.text_encoder.parameters()).device
        tok = self.tokenizer([" ".join(p.split()) for p in prompts], padding="max_length", max_length=self.text_length,
                             truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        hidden = self.text_encoder(ids, mask).last_hidden_state
        keep = (torch.arange(ids.shape[1], device=device)[None] < mask.gt(0).sum(1, keepdim=True))[..., None]
        return (hidden * keep).float()


# ---------------------------------------------------------------------------------------------
# configs


def tiny_configs(variant: str | None = None) -> dict[str, dict]:
    """Small configs after diffusers' own Wan tests (tests/pipelines/wan/test_wan.py; test_wan_22.py's 5B for a
    TI2V `variant`: the Wan 2.2 VAE's 48 channels, 2x2 pixel patches and 16x spatial factor;
    test_wan_image_to_video.py's for an I2V one: 36 input channels, a CLIP of width 4), a UMT5 of the same size."""
    ti2v = variant in FIRST_FRAME_VARIANTS
    configs = {
        "transformer": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                            out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2,
                            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        "vae": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                    temperal_downsample=[False, True, True]),
        "text_encoder": dict(vocab_size=ByteTokenizer.vocab_size, d_model=32, d_kv=8, d_ff=32, num_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                             feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
                             decoder_start_token_id=0),
    }
    if variant in I2V_VARIANTS:  # diffusers' tests/pipelines/wan/test_wan_image_to_video.py
        configs["transformer"].update(in_channels=36, image_dim=4)
        configs["image_encoder"] = dict(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, intermediate_size=16, patch_size=1)
    if ti2v:  # latent statistics other than 0 and 1, so that tests see the normalisation
        configs["transformer"].update(in_channels=48, out_channels=48)
        configs["vae"].update(z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
                              scale_factor_spatial=16, scale_factor_temporal=4,
                              latents_mean=[(i % 5 - 2) / 10 for i in range(48)],
                              latents_std=[1 + (i % 3) / 2 for i in range(48)])
    return configs


def from_configs(configs: dict[str, dict], tokenizer=None, text_length: int = TEXT_LENGTH,
                 flow_shift: float = DEFAULT_SHIFT, seed: int | None = None, expand_timesteps: bool = False) -> Wan:
    """Random init from config dicts, on the current default device and dtype (build under torch.device("meta")
    for shapes only). With `seed`, each part is seeded on its own: seed (transformer), + 1 (VAE), + 2 (text)."""
    def seeded(i: int) -> None:
        if seed is not None:
            torch.manual_seed(seed + i)

    def clean(c: dict) -> dict:
        return {k: v for k, v in c.items() if not k.startswith("_")}

    seeded(0)
    transformer = WanTransformer3DModel.from_config(clean(configs["transformer"])).eval()
    seeded(1)
    vae = AutoencoderKLWan.from_config(clean(configs["vae"])).eval()
    seeded(2)
    text = configs["text_encoder"]
    text_encoder = UMT5EncoderModel(text if isinstance(text, UMT5Config) else UMT5Config(**clean(text))).eval()
    check_image_branch(transformer.config, "the transformer config")
    image_encoder = processor = None
    if "image_encoder" in configs:
        from transformers import CLIPImageProcessor  # lazy: importing it warns when torchvision is absent

        seeded(3)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(**clean(configs["image_encoder"]))).eval()
        size = image_encoder.config.image_size
        processor = CLIPImageProcessor(crop_size=size, size=size)
    return Wan(transformer, vae, text_encoder, tokenizer, text_length, flow_shift, expand_timesteps, image_encoder,
               processor)


def check_image_branch(config, where: str) -> None:
    """The transformer layouts vidgen runs: in_channels = out_channels (text-to-video, TI2V), or the image as
    2 * out_channels + 4 input channels with a CLIP image embedder (Wan 2.1 I2V). Wan 2.2 I2V-A14B's channels come
    without CLIP (image_dim null), and its second expert (transformer_2/) is not loaded: refused."""
    cin, cout, image_dim = config.get("in_channels"), config.get("out_channels"), config.get("image_dim")
    if cin == cout and not image_dim:
        return
    if cin == 2 * (cout or 0) + 4 and image_dim:
        return
    raise ModelError(f"{where}: in_channels={cin}, out_channels={cout}, image_dim={image_dim}; vidgen runs Wan "
                     "text-to-video and TI2V (in_channels = out_channels, no image_dim) and Wan 2.1 I2V "
                     "(in_channels = 2 * out_channels + 4 with image_dim), not Wan 2.2 I2V-A14B")


# The published architectures (Wan2.1 README's table: dim, ffn, heads, layers; Wan2.2 README for TI2V-5B; the VAEs
# and UMT5-XXL as their diffusers directories' config.json files give them). Counted on the meta device
# (tests/test_wan.py): transformer 1,418,996,800 (T2V-1.3B), 14,288,491,584 (T2V-14B), 4,999,787,712 (TI2V-5B);
# VAE 2.1 126,892,531, VAE 2.2 704,688,668; UMT5-XXL encoder 5,680,910,336.
_DIT = dict(patch_size=(1, 2, 2), attention_head_dim=128, text_dim=4096, freq_dim=256, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_VAE_21 = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
_VAE_22 = dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
               temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
               patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
               latents_mean=[0.0] * 48, latents_std=[1.0] * 48)  # shapes only: the real statistics are in vae/
_UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)
VARIANTS = {
    "Wan2.1-T2V-1.3B": dict(transformer=dict(_DIT, num_attention_heads=12, ffn_dim=8960, num_layers=30,
                                             in_channels=16, out_channels=16), vae=_VAE_21, text_encoder=_UMT5_XXL),
    "Wan2.1-T2V-14B": dict(transformer=dict(_DIT, num_attention_heads=40, ffn_dim=13824, num_layers=40,
                                            in_channels=16, out_channels=16), vae=_VAE_21, text_encoder=_UMT5_XXL),
    "Wan2.2-TI2V-5B": dict(transformer=dict(_DIT, num_attention_heads=24, ffn_dim=14336, num_layers=30,
                                            in_channels=48, out_channels=48), vae=_VAE_22, text_encoder=_UMT5_XXL),
    # Wan2.1-I2V-14B-480P-Diffusers' transformer/ and image_encoder/ (open-clip ViT-H/14) configs; counted on the
    # meta device: transformer 16,394,878,784, CLIP vision tower 630,766,080
    "Wan2.1-I2V-14B": dict(transformer=dict(_DIT, num_attention_heads=40, ffn_dim=13824, num_layers=40,
                                            in_channels=36, out_channels=16, image_dim=1280, added_kv_proj_dim=5120),
                           vae=_VAE_21, text_encoder=_UMT5_XXL,
                           image_encoder=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                              num_attention_heads=16, image_size=224, patch_size=14,
                                              projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)),
}


FIRST_FRAME_VARIANTS = ("Wan2.2-TI2V-5B",)  # diffusers' pipeline flag expand_timesteps=True
I2V_VARIANTS = ("Wan2.1-I2V-14B",)  # the image as input channels, with CLIP


def variant_of(path: str | None) -> str:
    """The published model a model.path names (its last component, e.g. .../Wan2.1-T2V-14B-Diffusers), else the
    1.3B: which built-in configs flavor=full and `vidgen plan` use when no config.json can be read."""
    name = (path or "").rstrip("/").rsplit("/", 1)[-1].lower()
    return next((v for v in VARIANTS if v.lower() in name), "Wan2.1-T2V-1.3B")


def full_size_configs(variant: str = "Wan2.1-T2V-1.3B") -> dict[str, dict]:
    return {k: dict(v) for k, v in VARIANTS[variant].items()}


def full(variant: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Wan:
    """A published architecture, random init, built directly in `dtype`; the byte-level tokenizer at 512 tokens."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return from_configs(full_size_configs(variant), ByteTokenizer(TEXT_LENGTH), TEXT_LENGTH, seed=seed,
                            expand_timesteps=variant in FIRST_FRAME_VARIANTS)
    finally:
        torch.set_default_dtype(previous)


def tiny(seed: int = 0, text_length: int = 16, variant: str | None = None) -> Wan:
    """`variant`: a published model's name (`variant_of`); a TI2V or I2V one gives the tiny architecture of its
    kind."""
    return from_configs(tiny_configs(variant), ByteTokenizer(text_length), text_length, DEFAULT_SHIFT, seed=seed,
                        expand_timesteps=variant in FIRST_FRAME_VARIANTS)


def _flow_shift(root: Path) -> float:
    f = root / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return DEFAULT_SHIFT
    try:
        return float(json.loads(f.read_text()).get("flow_shift") or DEFAULT_SHIFT)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{f}: not a readable scheduler config ({brief(e)})") from None


def parse_model_index(text: str, where: str) -> dict:
    """diffusers' model_index.json of a Wan directory, checked for what vidgen runs: `expand_timesteps` (true for
    Wan2.2-TI2V-5B-Diffusers) a bool, and one transformer. Wan 2.2's A14B models hand the low-noise steps to a second
    expert (transformer_2/ below `boundary_ratio`); vidgen trains and samples one transformer, so they are refused
    rather than half loaded."""
    try:
        index = json.loads(text)
        flag = index.get("expand_timesteps", False)
        second, boundary = index.get("transformer_2"), index.get("boundary_ratio")
    except (ValueError, AttributeError) as e:
        raise ModelError(f"{where}: not a readable diffusers model index ({brief(e)})") from None
    if not isinstance(flag, bool):
        raise ModelError(f"{where}: expand_timesteps={flag!r}, expected true or false")
    if boundary is not None or (any(second) if isinstance(second, list) else second):  # TI2V-5B: [null, null]
        raise ModelError(f"{where}: a two-expert Wan 2.2 A14B pipeline (transformer_2={second}, boundary_ratio="
                         f"{boundary}); vidgen runs one transformer: Wan 2.1 T2V/I2V or Wan 2.2 "
                         "TI2V-5B")
    return index


def _expand_timesteps(root: Path) -> bool:
    """model_index.json's expand_timesteps (diffusers' WanPipeline / WanImageToVideoPipeline flag); false when the
    file or the key is absent."""
    f = root / "model_index.json"
    if not f.is_file():
        return False
    try:
        text = f.read_text()
    except OSError as e:
        raise ModelError(f"{f}: not a readable diffusers model index ({brief(e)})") from None
    return parse_model_index(text, str(f)).get("expand_timesteps", False)


def pretrained(path: str, cache_dir: str = "~/.cache/vidgen/models", dtype: torch.dtype = torch.float32) -> Wan:
    """A diffusers Wan directory (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers copied to disk or object storage)."""
    from transformers import AutoTokenizer  # lazy: tokenizers load only for pretrained weights

    root = resolve_model_dir(path, cache_dir, "diffusers-format Wan", SUBFOLDERS)
    missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise ModelError(f"{path}: missing subfolder(s) {', '.join(missing)} of a diffusers Wan directory")
    try:
        config = json.loads((root / "transformer" / "config.json").read_text())
        config.get("image_dim")
    except (OSError, ValueError, AttributeError):
        config = {}  # unreadable: from_pretrained below says so
    if config:
        check_image_branch(config, f"{path}: transformer/config.json")
    clip = [s for s in CLIP_SUBFOLDERS if not (root / s).is_dir()] if config.get("image_dim") else []
    if clip:
        raise ModelError(f"{path}: missing subfolder(s) {', '.join(clip)} of a diffusers Wan I2V directory (its "
                         f"transformer has image_dim={config['image_dim']})")
    expand = _expand_timesteps(root)
    try:
        transformer = WanTransformer3DModel.from_pretrained(root, subfolder="transformer", torch_dtype=dtype,
                                                            local_files_only=True).eval()
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=torch.float32,
                                               local_files_only=True).eval()
        text_encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", torch_dtype=dtype,
                                                        local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    except Exception as e:  # unreadable configs, truncated or foreign weights
        raise ModelError(f"{path}: cannot load the Wan transformer/vae/text_encoder/tokenizer ({brief(e)})") from None
    image_encoder = processor = None
    if transformer.config.image_dim:  # Wan 2.1 I2V: its CLIP
        from transformers import CLIPImageProcessor  # lazy: importing it warns when torchvision is absent

        try:
            image_encoder = CLIPVisionModel.from_pretrained(root / "image_encoder", torch_dtype=dtype,
                                                            local_files_only=True).eval()
            processor = CLIPImageProcessor.from_pretrained(root / "image_processor", local_files_only=True)
        except Exception as e:
            raise ModelError(f"{path}: cannot load the Wan image_encoder/image_processor ({brief(e)})") from None
    return Wan(transformer, vae, text_encoder, tokenizer, TEXT_LENGTH, _flow_shift(root), expand, image_encoder,
               processor)


def build(flavor: str, *, path: str | None = None, cache_dir: str = "~/.cache/vidgen/models", seed: int = 0,
          attention: str = "sdpa", dtype: torch.dtype = torch.float32) -> Wan:
    """The entry point configs use (model.family=wan). `dtype`: what pretrained weights load in (the recipe's
    frozen-base dtype); the VAE stays fp32."""
    check_backend(attention)  # before loading gigabytes of weights
    if flavor == "tiny":
        model = tiny(seed, variant=variant_of(path))
    elif flavor == "full":
        model = full(variant_of(path), seed, dtype)
    elif flavor == "pretrained":
        if not path:
            raise ModelError("model.path: required for model.flavor=pretrained (a diffusers Wan directory)")
        model = pretrained(path, cache_dir, dtype)
    else:
        raise ModelError(f"model.flavor={flavor}: expected one of tiny, full, pretrained")
    return model.set_attention(attention)


def from_config(m, seed: int = 0, dtype: torch.dtype = torch.float32) -> Wan:
    """The model a `model.*` config section describes (vidgen.config.ModelConfig)."""
    return build(m.flavor, path=m.path, cache_dir=m.cache_dir, seed=seed, attention=m.attention, dtype=dtype)
