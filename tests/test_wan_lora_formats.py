"""Wan LoRA export in PEFT, diffusers and ComfyUI layouts: each loads back (stock PEFT, stock diffusers'
WanPipeline, ComfyUI's own patch rule restated here) and reproduces the trained adapter's output.

A tiny WanTransformer3DModel (diffusers' own test config) carries a LoRA with alpha != rank (r=4, alpha=6: scaling
1.5), so a format that dropped alpha or assumed alpha = r would be off by half the update.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidgen.errors import ModelError
from vidgen.models import lora
from vidgen.models.wan import lora_formats as lf

pytest.importorskip("diffusers")
pytest.importorskip("peft")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
RANK, ALPHA = 4, 6


def tiny_transformer(**extra):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, **extra,
    ).eval()


def forward(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 8, 8, generator=g)
    text = torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return model(latents, torch.tensor([500]), text, return_dict=False)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(LoRA-adapted transformer, its output, export directory): B is random so the adapter changes the output."""
    from peft import LoraConfig

    model = tiny_transformer()
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(2)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    out_dir = str(tmp_path_factory.mktemp("wanlora") / "lora")
    lf.save_wan_lora(model, out_dir)
    return model, forward(model), out_dir


def test_names_invert_diffusers_single_file_conversion():
    """Every Linear of a tiny image-to-video Wan maps to an original name that diffusers' own checkpoint converter
    (convert_wan_transformer_to_diffusers) turns back into the same diffusers name; non-Linear layers are refused."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    with torch.device("meta"):
        model = tiny_transformer(image_dim=4, added_kv_proj_dim=24)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 12 + 8  # 12 per block (q k v o twice, k_img v_img, ffn 0 2) + 8 outside the blocks
    originals = {lf.wan_name(n): n for n in linears}
    assert originals["blocks.1.cross_attn.k_img"] == "blocks.1.attn2.add_k_proj"
    assert originals["head.head"] == "proj_out"
    converted = convert_wan_transformer_to_diffusers({f"{o}.weight": torch.zeros(1) for o in originals})
    assert sorted(converted) == sorted(f"{n}.weight" for n in linears)
    assert all(lf.diffusers_name(o) == n for o, n in originals.items())
    with pytest.raises(ModelError, match="'patch_embedding': not a Wan diffusers Linear"):
        lf.wan_name("patch_embedding")


def test_peft_layout_reloads_exactly(trained):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    model, expected, out_dir = trained
    weights = load_file(f"{out_dir}/{lora.PEFT_WEIGHTS}")
    assert "base_model.model.blocks.0.attn1.to_q.lora_A.weight" in weights
    config = json.loads(open(f"{out_dir}/{lora.PEFT_CONFIG}").read())
    assert (config["r"], config["lora_alpha"]) == (RANK, ALPHA)
    fresh = tiny_transformer()  # stock PEFT, config and weights from the files only
    inject_adapter_in_model(LoraConfig(**config), fresh)
    result = set_peft_model_state_dict(fresh, {k.removeprefix("base_model.model."): v for k, v in weights.items()})
    assert not result.unexpected_keys
    assert torch.equal(forward(fresh), expected)
    loaded = tiny_transformer()  # and vidgen's own reader
    lora.load_lora(loaded, out_dir)
    assert torch.equal(forward(loaded), expected)


def tiny_pipeline():
    """WanPipeline from tiny configs, all offline: UMT5 encoder, Wan VAE, and a T5 tokenizer over a 30-piece vocab."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import T5TokenizerFast, UMT5Config, UMT5EncoderModel

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(chr(c), -1.0) for c in range(97, 123)]
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=32, num_layers=2,
                                          num_heads=4, relative_attention_num_buckets=8)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=T5TokenizerFast(vocab=pieces, extra_ids=0), text_encoder=encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), transformer=tiny_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    return pipe("a red car", height=16, width=16, num_frames=5, num_inference_steps=2,
                guidance_scale=1.0, max_sequence_length=16, output_type="pt",
                generator=torch.Generator().manual_seed(3)).frames


def test_diffusers_layout_loads_in_wan_pipeline(trained):
    """`WanPipeline.load_lora_weights(dir)` gives the same video as the trained adapter, and the file carries
    the adapter config (alpha 6, not the r that diffusers would assume without it)."""
    model, _, out_dir = trained
    pipe = tiny_pipeline()
    pipe.transformer = model
    expected = generate(pipe)
    pipe.transformer = tiny_transformer()
    pipe.load_lora_weights(out_dir)
    assert torch.equal(generate(pipe), expected)
    from safetensors import safe_open

    with safe_open(f"{out_dir}/{lora.DIFFUSERS_WEIGHTS}", framework="pt") as f:
        assert all(k.startswith("transformer.blocks.") for k in f.keys())
        assert json.loads(f.metadata()[lora.METADATA_KEY])["transformer.lora_alpha"] == ALPHA


def test_comfy_layout_round_trips_and_names_modules_as_wan(trained):
    model, _, out_dir = trained
    comfy = load_file(f"{out_dir}/{lf.COMFY_WEIGHTS}")
    assert len(comfy) == 3 * 2 * 10  # down, up, alpha for 10 layers in each of 2 blocks
    assert comfy["diffusion_model.blocks.0.self_attn.q.lora_down.weight"].shape == (RANK, 24)
    assert comfy["diffusion_model.blocks.1.cross_attn.o.lora_up.weight"].shape == (24, RANK)
    assert comfy["diffusion_model.blocks.1.ffn.0.alpha"].item() == ALPHA
    state, config = lf.read_comfy(out_dir)
    trained_state = lora.lora_state_dict(model)
    assert sorted(state) == sorted(trained_state)
    assert all(torch.equal(state[k], trained_state[k]) for k in state)
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (RANK, ALPHA, {}, {})


def test_comfy_layout_applied_the_way_comfyui_patches_weights(trained):
    """ComfyUI's rule, restated: the key `diffusion_model.<name>` patches its Wan weight `<name>.weight` with
    alpha / rows(lora_down) * lora_up @ lora_down. The Wan name goes to diffusers through diffusers' own
    checkpoint converter, not vidgen's table."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    _, expected, out_dir = trained
    comfy = load_file(f"{out_dir}/{lf.COMFY_WEIGHTS}")
    fresh = tiny_transformer()
    assert not torch.allclose(forward(fresh), expected, atol=1e-2)  # the LoRA matters: the checks here can fail
    params = dict(fresh.named_parameters())
    for key in [k for k in comfy if k.endswith(".lora_down.weight")]:
        name = key.removeprefix("diffusion_model.").removesuffix(".lora_down.weight")
        (target,) = convert_wan_transformer_to_diffusers({f"{name}.weight": None})
        down, up = comfy[key], comfy[f"diffusion_model.{name}.lora_up.weight"]
        params[target].data += comfy[f"diffusion_model.{name}.alpha"].item() / down.shape[0] * up @ down
    torch.testing.assert_close(forward(fresh), expected, rtol=1e-5, atol=1e-5)


def test_comfy_layout_loads_through_diffusers_wan_converter(trained):
    """diffusers reads ComfyUI-format Wan LoRAs (`_convert_non_diffusers_wan_lora_to_diffusers` folds alpha / r
    into the matrices); loaded that way the output matches the trained adapter."""
    from diffusers import WanPipeline

    _, expected, out_dir = trained
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=tiny_transformer())
    pipe.load_lora_weights(out_dir, weight_name=lf.COMFY_WEIGHTS)
    torch.testing.assert_close(forward(pipe.transformer), expected, rtol=1e-5, atol=1e-6)


def test_rslora_alpha_keeps_the_scaling():
    """Under rsLoRA PEFT scales by alpha / sqrt(r); ComfyUI knows only alpha / r, so the file's alpha is
    alpha * sqrt(r), and the read-back config is plain LoRA with that alpha."""
    state = {"blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 24),
             "blocks.0.attn1.to_q.lora_B.weight": torch.ones(24, 4)}
    comfy = lf.comfy_state(state, {"r": 4, "lora_alpha": 3, "use_rslora": True})
    assert comfy["diffusion_model.blocks.0.self_attn.q.alpha"].item() == pytest.approx(3 * 2)
    _, config = lf.state_from_comfy(comfy)
    assert config["lora_alpha"] / config["r"] == pytest.approx(3 / 4 ** 0.5)


def test_musubi_names_mixed_ranks_and_missing_alpha(trained):
    """musubi-tuner's flattened names read too; a module with another rank goes to rank_pattern, one without
    `.alpha` gets alpha = r, and PEFT builds and fills an adapter from the result."""
    from peft import LoraConfig, inject_adapter_in_model

    _, _, out_dir = trained
    comfy = load_file(f"{out_dir}/{lf.COMFY_WEIGHTS}")
    musubi = {}
    for k, v in comfy.items():
        body = k.removeprefix("diffusion_model.")
        suffix = next(s for s in (".lora_down.weight", ".lora_up.weight", ".alpha") if body.endswith(s))
        musubi["lora_unet_" + body.removesuffix(suffix).replace(".", "_") + suffix] = v
    musubi["lora_unet_blocks_1_ffn_2.lora_down.weight"] = torch.randn(2, 32)
    musubi["lora_unet_blocks_1_ffn_2.lora_up.weight"] = torch.randn(24, 2)
    del musubi["lora_unet_blocks_1_ffn_2.alpha"]
    state, config = lf.state_from_comfy(musubi)
    key = re.escape("blocks.1.ffn.net.2")
    assert (config["rank_pattern"], config["alpha_pattern"]) == ({key: 2}, {key: 2.0})
    assert torch.equal(state["blocks.0.attn2.to_k.lora_B.weight"],
                       comfy["diffusion_model.blocks.0.cross_attn.k.lora_up.weight"])
    fresh = tiny_transformer()
    inject_adapter_in_model(LoraConfig(**config), fresh, adapter_name=lora.ADAPTER)
    lora.set_peft_state(fresh, state)
    layer = fresh.get_submodule("blocks.1.ffn.net.2")
    assert (layer.r[lora.ADAPTER], layer.scaling[lora.ADAPTER]) == (2, 1.0)
    assert fresh.get_submodule("blocks.0.attn1.to_q").scaling[lora.ADAPTER] == ALPHA / RANK


def test_bad_files_are_refused_in_one_line(tmp_path):
    with pytest.raises(ModelError, match=r"'diffusion_model\.blocks\.0\.self_attn\.q\.weight': expected"):
        lf.state_from_comfy({"diffusion_model.blocks.0.self_attn.q.weight": torch.ones(1)})
    with pytest.raises(ModelError, match="'blocks.0.self_attn.q': lora_down and lora_up must both be present"):
        lf.state_from_comfy({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 3)})
    with pytest.raises(ModelError, match="expected the prefix 'diffusion_model.'"):
        lf.state_from_comfy({"model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 3)})
    with pytest.raises(ModelError, match="'blocks.0.self_attn.qq': not a Wan original Linear"):
        lf.state_from_comfy({"diffusion_model.blocks.0.self_attn.q.alpha": torch.ones(())} | {
            "diffusion_model.blocks.0.self_attn.qq.lora_down.weight": torch.ones(2, 3)})
    dora = {"blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 3),
            "blocks.0.attn1.to_q.lora_B.weight": torch.ones(3, 2),
            "blocks.0.attn1.to_q.lora_magnitude_vector": torch.ones(3)}
    with pytest.raises(ModelError, match="lora_magnitude_vector' is not a plain LoRA matrix"):
        lf.write_wan_lora_dir(dora, {"r": 2, "lora_alpha": 2}, str(tmp_path))
    assert not list(tmp_path.iterdir())  # refused before any file was written
    (tmp_path / "x.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="x.safetensors: not a safetensors file"):
        lf.read_comfy(str(tmp_path / "x.safetensors"))
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(2, 3)},
              str(tmp_path / "y.safetensors"))
    with pytest.raises(ModelError, match="y.safetensors: LoRA module 'blocks.0.self_attn.q'"):
        lf.read_comfy(str(tmp_path / "y.safetensors"))
