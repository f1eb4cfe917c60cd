"""SDXL text conditioning: two CLIP text encoders and their tokenizers, micro-conditioning, tiny builds.

Shapes: B batch, S tokens (77 for the real tokenizers), D1/D2 hidden widths of the two encoders.

    prompt_embeds [B, S, D1 + D2] = concat(enc1(tok1).hidden_states[-2], enc2(tok2).hidden_states[-2])
    pooled        [B, P]          = enc2(tok2).text_embeds (the projection of the second encoder)
    time_ids      [B, 6]          = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)

This is what Hotshot-XL's fine_tune.py and diffusers' SDXL pipeline compute. Micro-conditioning is built in
(h, w) / (top, left) order everywhere in vidgen, in training and inference alike (Hotshot's training collate used
PIL's (w, h) order while its pipeline uses (h, w); training.md 2.3).

The tiny flavor builds both tokenizers offline from a byte-level vocabulary (no merges, no download) and the
text encoders from diffusers' AnimateDiff-SDXL test config (training.md 4.6).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from vidgen.errors import ModelError, brief


@dataclass
class SDXLText:
    tokenizer: object  # CLIPTokenizer
    tokenizer_2: object  # CLIPTokenizer
    text_encoder: torch.nn.Module  # CLIPTextModel
    text_encoder_2: torch.nn.Module  # CLIPTextModelWithProjection

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SDXLText:
        self.text_encoder.to(device=device, dtype=dtype)
        self.text_encoder_2.to(device=device, dtype=dtype)
        return self

    @property
    def width(self) -> int:
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [B, S, D1 + D2], pooled [B, P]): penultimate hidden states, pooled from encoder 2."""
        device = next(self.text_encoder.parameters()).device
        hidden = []
        pooled = None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            out = enc(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
        return torch.cat(hidden, dim=-1), pooled


def add_time_ids(original_hw: torch.Tensor, crop_tl: torch.Tensor, target_hw: torch.Tensor) -> torch.Tensor:
    """[B, 6] micro-conditioning from [B, 2] tensors, each already in (h, w) / (top, left) order."""
    return torch.cat([original_hw, crop_tl, target_hw], dim=1).float()


def time_ids_for(batch: int, target_hw: tuple[int, int], original_hw: tuple[int, int] | None = None,
                 crop_tl: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Constant micro-conditioning for a batch; the original size defaults to the target size."""
    def rows(v):
        return torch.tensor([list(v)] * batch, dtype=torch.float32)
    return add_time_ids(rows(original_hw or target_hw), rows(crop_tl), rows(target_hw))


# ---------------------------------------------------------------------------------------------
# tiny flavor


def byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and word-final, plus the two special tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def tiny_tokenizer(max_length: int = 16):
    """A CLIP tokenizer built offline: byte-level tokens, no merges (every character is a token)."""
    return CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=max_length)


@dataclass(frozen=True)
class TinyTextConfig:
    hidden: int = 32
    layers: int = 2
    heads: int = 4
    projection_dim: int = 32
    max_length: int = 16


def tiny_text(seed: int = 0, cfg: TinyTextConfig = TinyTextConfig()) -> SDXLText:
    vocab = byte_vocab()
    config = CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"], hidden_size=cfg.hidden, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=cfg.heads, num_hidden_layers=cfg.layers, vocab_size=1000, hidden_act="gelu",
        projection_dim=cfg.projection_dim, max_position_embeddings=max(77, cfg.max_length),
    )
    torch.manual_seed(seed + 10)
    enc1 = CLIPTextModel(config).eval()
    torch.manual_seed(seed + 11)
    enc2 = CLIPTextModelWithProjection(config).eval()
    return SDXLText(tiny_tokenizer(cfg.max_length), tiny_tokenizer(cfg.max_length), enc1, enc2)


# ---------------------------------------------------------------------------------------------
# pretrained flavor


def pretrained_text(root: str | Path, tokenizer_path: str | None = None, tokenizer_2_path: str | None = None,
                    text_encoder_path: str | None = None, text_encoder_2_path: str | None = None) -> SDXLText:
    """Tokenizers and encoders from a local SDXL directory (`tokenizer/`, `tokenizer_2/`, `text_encoder/`,
    `text_encoder_2/`), each overridable by its own local path."""
    root = Path(root)
    parts = {"tokenizer": tokenizer_path, "tokenizer_2": tokenizer_2_path, "text_encoder": text_encoder_path,
             "text_encoder_2": text_encoder_2_path}
    paths = {k: Path(v) if v else root / k for k, v in parts.items()}
    missing = [f"{k} ({p})" for k, p in paths.items() if not p.is_dir()]
    if missing:
        raise ModelError(f"{root}: missing SDXL text component(s) {', '.join(missing)}; expected local "
                         "directories (tokenizers and encoders are never downloaded)")
    try:
        return SDXLText(
            CLIPTokenizer.from_pretrained(paths["tokenizer"], local_files_only=True),
            CLIPTokenizer.from_pretrained(paths["tokenizer_2"], local_files_only=True),
            CLIPTextModel.from_pretrained(paths["text_encoder"], local_files_only=True).eval(),
            CLIPTextModelWithProjection.from_pretrained(paths["text_encoder_2"], local_files_only=True).eval(),
        )
    except Exception as e:  # unreadable configs or tokenizer files, truncated or foreign weights
        raise ModelError(f"{root}: cannot load the SDXL text encoders ({brief(e)})") from None


# ---------------------------------------------------------------------------------------------
# full-size configs (no weights): what `vidgen plan` builds on the meta device


def full_size_text_configs() -> dict[str, dict]:
    """CLIPTextConfig kwargs of stabilityai/stable-diffusion-xl-base-1.0's `text_encoder/` and `text_encoder_2/`.

    text_encoder: OpenAI CLIP ViT-L/14's text tower (CLIPTextModel, 123,060,480 parameters). text_encoder_2:
    OpenCLIP ViT-bigG/14's text tower with its 1280-wide projection (CLIPTextModelWithProjection, 694,659,840).
    """
    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
                  eos_token_id=2, pad_token_id=1)
    return {
        "text_encoder": dict(common, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768),
        "text_encoder_2": dict(common, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                               num_attention_heads=20, hidden_act="gelu", projection_dim=1280),
    }


def text_from_configs(configs: dict[str, dict], max_length: int = 77) -> SDXLText:
    """Both encoders from CLIPTextConfig kwargs (randomly initialised on the current default device, so build
    under `torch.device("meta")` for shapes only) with the offline byte-level tokenizers (no download)."""
    enc1 = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).eval()
    enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])).eval()
    return SDXLText(tiny_tokenizer(max_length), tiny_tokenizer(max_length), enc1, enc2)
