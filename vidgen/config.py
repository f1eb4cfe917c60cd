"""Job configs: pydantic models, YAML loading and dotted `key=value` overrides.

One root model, `VidgenConfig`, describes every job; `vidgen train` reads `run`, `data`, `model`,
`train`; `vidgen generate` reads `model` and `generate`; `vidgen eval` reads `eval`. A config file
only states what differs from the defaults below, and a run logs the fully resolved config, so any
run can be repeated from its logged YAML.

Bad input never surfaces as a pydantic traceback: `load_config` raises `ConfigError` with one line
per problem, e.g. ``train.zero_stage=7: expected one of 0, 1, 2, 3``.
"""

from __future__ import annotations

import datetime
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidgen.errors import ConfigError
from vidgen.sizes import parse_buckets


def multiple_of_8(v: int) -> int:
    """A pixel size the VAE can encode without rounding it down: a multiple of 8, or the nearest ones named."""
    if v % 8:
        nearest = " or ".join(str(n) for n in (v - v % 8, v - v % 8 + 8) if n >= 8)
        raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8); nearest: {nearest}")
    return v


class Section(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("vidgen", description="Run name: MLflow run name and Ray Train experiment name.")
    workdir: str = Field(
        "./work", description="Local or fsspec URI under which every output of the run is written."
    )
    seed: int = Field(0, description="Base seed; workers and actors derive their own from it.")
    shared_filesystem: bool = Field(
        False,
        description="Local paths (run.workdir, train.storage_path, generate.output, latents.output) are a mount "
        "every Ray node shares (NFS, EFS, Lustre). Unset, a local path is refused on a cluster of several nodes: "
        "workers on other nodes would write files the driver never sees.",
    )

    @field_validator("name")
    @classmethod
    def _portable_name(cls, v: str) -> str:
        # It names folders under train.storage_path (checkpoints, export), MLflow runs and Ray experiments: ASCII
        # only (Ray's and MLflow's logs encode names as ASCII on some hosts), never a path outside its parent.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v) or ".." in v:
            raise ValueError("expected 1-100 of the letters A-Z a-z, digits 0-9, '.', '_', '-', starting with a "
                             "letter or digit, without '..'")
        return v


class TrackingConfig(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI. Unset: $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db.",
    )
    experiment: str = Field("vidgen", description="MLflow experiment name.")
    enabled: bool = Field(True, description="Log to MLflow at all.")


class RayConfig(Section):
    address: str | None = Field(
        None, description="Ray cluster address ('auto' inside `ray job submit'); unset starts a local Ray."
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="Logical CPUs of a local Ray (more than physical cores lets data tasks run beside "
        "train workers on small machines).",
    )


Layout = Literal["auto", "hotshot", "frames", "videos", "opv2v", "sthv2", "shards"]


class DataConfig(Section):
    source: str = Field("", description="Dataset root: local path, file://, s3://, gs:// or any fsspec URI.")
    layout: Layout = Field("auto", description="How samples are laid out under `source`.")
    height: int = Field(64, ge=8, description="Clip height in pixels after resize and crop.")
    width: int = Field(64, ge=8, description="Clip width in pixels after resize and crop.")
    fps: float | None = Field(
        None, gt=0, description="Target fps; frames are strided from the source fps. Unset: every frame."
    )
    source_fps: float = Field(8.0, gt=0, description="Frame rate of frame-folder layouts.")
    clips_per_video: int = Field(1, ge=1, description="Clips drawn from each video per epoch.")
    default_prompt: str = Field("", description="Prompt for samples that have none.")
    buckets: str | None = Field(
        None,
        description="Aspect-ratio buckets: a preset (hotshot-512, svd) or 'WxH,WxH,...'; each clip goes to the "
        "nearest bucket instead of height x width (which are then unused; plans and validation take the largest "
        "bucket). Unset: every clip is height x width.",
    )
    camera: int = Field(0, ge=0, le=3, description="OPV2V camera (0 front, 1 right-rear, 2 left-rear, 3 back).")
    prompt_template: str = Field(
        "a front camera driving video, {scenario}",
        description="OPV2V prompt; {scenario}, {split}, {cav} are filled in per sample.",
    )
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the job when more than this fraction of samples is skipped."
    )
    read_cpus: float = Field(
        1.0, gt=0, description="CPUs each Ray Data read task reserves while it decodes and resizes its samples. 1: "
        "one task per free core, each decoding at full speed (one core measured 187 frames/s of 720p JPEG at 1, "
        "69 at 0.25, where four tasks with their own imports share the core). Lower it only to let data tasks "
        "squeeze beside workers that reserve every CPU of a node.",
    )
    samples_per_task: int = Field(
        16, ge=1, description="Samples one read task decodes (Ray Data splits its output into blocks of at most "
        "128 MB). Fewer, longer tasks spend less on scheduling: over 600 samples of 14 720p frames, 2 cores read 474 "
        "frames/s at 16 and 341 at 4 (1 core: 272 and 263). Lower it for datasets of a few dozen samples, where "
        "the last tasks run alone.",
    )
    latents: str | None = Field(
        None, description="A latent cache written by `vidgen prepare latents` (local path or URI): training reads "
        "the encoded latents and conditioning from it instead of decoding and encoding clips. Its key must match "
        "this config (refused otherwise, naming the differing field).",
    )

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        return multiple_of_8(v)

    @field_validator("buckets")
    @classmethod
    def _bucket_sizes(cls, v: str | None) -> str | None:
        """Refuse a spec `parse_buckets` would refuse later, naming the expected forms; the string is kept."""
        try:
            parse_buckets(v)
        except ConfigError as e:  # its message starts with "data.buckets: "; load_config names the key itself
            raise ValueError(str(e).removeprefix("data.buckets: ")) from None
        return v

    def largest_size(self) -> tuple[int, int]:
        """(height, width) of the biggest clip: height x width, or with buckets the largest bucket by area.
        What `vidgen plan` sizes memory, FLOPs and the latent cache by, and what validation samples at."""
        sizes = parse_buckets(self.buckets)
        return max(sizes, key=lambda hw: (hw[0] * hw[1], hw[1])) if sizes else (self.height, self.width)


class ModelConfig(Section):
    family: str = Field(
        "svd", description="Model family (vidgen.models.registry): svd (Stable Video Diffusion) or hotshot (SDXL + "
        "Hotshot-XL temporal layers), or one that model.family_module registers."
    )
    family_module: str | None = Field(
        None, description="An importable module defining model families of your own (it calls "
        "vidgen.models.registry.register on import); it must be on the Python path of the driver and every Ray node."
    )
    flavor: Literal["tiny", "full", "pretrained"] = Field(
        "tiny", description="tiny: random init from a small config (tests, demo); full: the published architecture "
        "at full size, random init from vidgen's built-in configs (benchmarks, memory checks); pretrained: load "
        "`path`."
    )
    path: str | None = Field(
        None,
        description="Diffusers-format model directory (local path or fsspec URI). Never downloaded from a hub.",
    )
    cache_dir: str = Field(
        "~/.cache/vidgen/models", description="Where remote model directories are copied once, keyed by URI."
    )
    num_frames: int = Field(
        8, ge=2, description="The model's frame window: frames per UNet call, and per training clip."
    )
    # Hotshot-XL (family=hotshot)
    temporal_layers: str | None = Field(
        None, description="hotshot: a Hotshot-XL temporal-layer file (hsxl_temporal_layers.safetensors, Hotshot key "
        "names) loaded over the model's own temporal layers; needed when model.path/unet is a plain SDXL UNet."
    )
    spatial_unet_base: str | None = Field(
        None, description="hotshot: a local SDXL UNet2DConditionModel directory replacing the spatial layers "
        "(Hotshot's --spatial_unet_base); the temporal layers are kept."
    )
    max_frames: int | None = Field(
        None, ge=1, description="hotshot: length of the temporal positional table. Unset: the weights' own (24)."
    )
    spatial_norm: Literal["clip", "frame"] = Field(
        "clip", description="hotshot: clip: resnet GroupNorm statistics span a clip's frames (Hotshot-XL's 3-D "
        "resnets); frame: each frame alone (diffusers' UNetMotionModel / AnimateDiff)."
    )
    attention: Literal["sdpa", "xformers", "eager"] = Field(
        "sdpa", description="Attention kernel of every attention layer: sdpa (PyTorch scaled_dot_product_attention, "
        "fused kernels on GPU), xformers (memory-efficient attention; needs xformers and a CUDA GPU), eager (plain "
        "matmul + softmax; the reference for numerics)."
    )

    @model_validator(mode="after")
    def _pretrained_needs_path(self) -> ModelConfig:
        if self.flavor == "pretrained" and not self.path:
            raise ValueError(
                "model.path: required when model.flavor=pretrained (a local diffusers directory or URI)"
            )
        return self


class LoraConfig(Section):
    """PEFT LoRA on the UNet's Linear layers (recipe svd_lora)."""

    rank: int = Field(4, ge=1, description="LoRA rank r: each targeted Linear(in, out) gains r * (in + out) weights.")
    alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Unset: alpha = rank (SVD Xtend)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input during training.")
    init: Literal["gaussian", "default"] = Field(
        "gaussian",
        description="PEFT init_lora_weights: gaussian (A ~ N(0, 1/r), SVD Xtend's choice) or default (A Kaiming-"
        "uniform); B starts at zero either way, so training starts from the base model.",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="Module name suffixes to wrap (PEFT matching: the full name equals one or ends with "
        "'.<suffix>'); every match must be a Linear layer.",
    )
    scope: Literal["all", "spatial", "temporal"] = Field(
        "all",
        description="all: every match; spatial: outside temporal_transformer_blocks; temporal: inside them only.",
    )
    patterns: list[str] = Field(
        default_factory=list,
        description="Extra filter: wrap only matches whose full module name contains one of these substrings. "
        "Empty: no further filter.",
    )
    export_merged: bool = Field(
        False, description="Also export the base UNet with the LoRA merged in (<storage_path>/<run.name>/export/unet, "
        "usable as generate.unet) beside the LoRA itself (.../export/lora)."
    )


class DDPMConfig(Section):
    """DDPM objective of recipe hotshot_temporal (Hotshot-XL's fine_tune.py, with its fixed bugs)."""

    prediction_type: Literal["scheduler", "epsilon", "v_prediction"] = Field(
        "scheduler", description="UNet target: scheduler (the model's scheduler config decides), epsilon or "
        "v_prediction."
    )
    noise_offset: float = Field(0.0, ge=0, description="Offset-noise strength: one extra N(0,1) draw per video and "
                                "channel, times this, added to the noise (Hotshot's seed run: 0.05).")
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR loss weighting gamma (e.g. 5.0); unset: plain MSE. Any float (Hotshot's "
        "--snr_gamma flag could only mean 1.0)."
    )
    caption_dropout: float = Field(
        0.0, ge=0, le=1, description="Probability of training a sample without its caption (zero text embeddings, "
        "the unconditional input of classifier-free guidance)."
    )
    default_prompt: str = Field("", description="Caption of clips whose rows carry no `prompt`.")


class EDMConfig(Section):
    """EDM objective of recipes svd_full and svd_lora (SVD Xtend's constants): sigma ~ LogNormal(p_mean, p_std)."""

    p_mean: float = Field(0.7, description="Mean of log sigma for training noise.")
    p_std: float = Field(1.6, gt=0, description="Std of log sigma for training noise.")
    cond_aug_mean: float = Field(-3.0, description="Mean of log sigma of the conditioning-frame noise.")
    cond_aug_std: float = Field(0.5, gt=0, description="Std of log sigma of the conditioning-frame noise.")
    conditioning_dropout: float = Field(
        0.1, ge=0, le=1 / 3, description="p of the InstructPix2Pix-style dropout of image and frame conditions."
    )
    motion_bucket_id: int = Field(
        127, ge=0, le=255, description="SVD motion bucket conditioning (a clip's own `motion_bucket_id` wins)."
    )


class FlowConfig(Section):
    """Flow-matching objective (recipes wan_lora, wan_full); the defaults are DiffSynth-Studio's Wan recipe
    (vidgen.models.wan.flow)."""

    timesteps: Literal["table", "uniform", "logit_normal"] = Field(
        "table", description="Noise-level sampling: table (a uniform pick of the shifted 1000-step schedule, "
        "DiffSynth-Studio), uniform (U(0, 1), then shifted), logit_normal (sigmoid of a normal draw, then shifted: "
        "finetrainers, musubi-tuner)."
    )
    shift: float = Field(5.0, gt=0, description="Time shift s: sigma -> s * sigma / (1 + (s - 1) * sigma).")
    logit_mean: float = Field(0.0, description="Mean of the normal draw of timesteps=logit_normal.")
    logit_std: float = Field(1.0, gt=0, description="Std of the normal draw of timesteps=logit_normal.")
    weighting: Literal["bell", "none"] = Field(
        "bell", description="Loss weight per noise level: bell (DiffSynth-Studio's) or none (plain MSE)."
    )


class TrainConfig(Section):
    recipe: str = Field(
        "svd_full", description="What trains and with which objective, one of model.family's recipes: svd_full (all "
        "or part of the SVD UNet), svd_lora (LoRA adapters from train.lora on a frozen SVD UNet), hotshot_temporal "
        "(Hotshot-XL's temporal layers on a frozen SDXL), wan_full / wan_lora (the Wan 2.x transformer, whole or "
        "LoRA)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (recipe svd_lora).")
    ddpm: DDPMConfig = Field(default_factory=lambda: DDPMConfig(),
                             description="DDPM objective settings (recipe hotshot_temporal).")
    edm: EDMConfig = Field(default_factory=lambda: EDMConfig(),
                           description="EDM objective settings (recipes svd_full, svd_lora).")
    flow: FlowConfig = Field(default_factory=lambda: FlowConfig(),
                             description="Flow-matching objective settings (recipes wan_lora, wan_full).")
    trainable: Literal["all", "temporal", "patterns"] = Field(
        "all",
        description="all: every UNet parameter; temporal: temporal transformer blocks only (SVD Xtend); "
        "patterns: parameters whose names contain one of train.trainable_patterns.",
    )
    trainable_patterns: list[str] = Field(
        default_factory=list, description="Substrings of parameter names to train when train.trainable=patterns."
    )
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on a GPU cluster).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Ray resources per worker, e.g. {CPU: 8, GPU: 1}. Empty: Ray's default."
    )
    accelerator_type: str | None = Field(None, description="Ray accelerator type to schedule on, e.g. A100.")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 2 partitions the optimizer states and gradients over the workers, 3 the "
        "parameters too (and can offload them), at a cost per module each step; on one worker without "
        "offload_params, 3 holds no less memory than 2."
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer states in CPU memory (stage >= 1).")
    offload_params: bool = Field(False, description="ZeRO-Infinity: parameters in CPU memory (stage 3 only).")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training precision (fp16 is refused on CPU)."
    )
    batch_size: int = Field(1, ge=1, description="Clips per worker per micro-step.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    activation_checkpointing: bool = Field(False, description="Recompute UNet activations in backward to save memory.")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="After warm-up: constant, cosine decay to 0, or linear decay to 0."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up steps.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_8bit: bool = Field(False, description="bitsandbytes 8-bit AdamW (GPU and bitsandbytes required).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 turns it off).")
    max_steps: int = Field(100, ge=1, description="Optimizer steps to train for.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints (and one at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept in storage.")
    max_failures: int = Field(2, ge=-1, description="Worker failures survived by resuming (-1: unlimited).")
    storage_path: str | None = Field(
        None, description="Where Ray Train keeps checkpoints, and the run's export beside them, under "
        "<storage_path>/<run.name>/ (shared storage on clusters). Unset: <workdir>/train."
    )
    deepspeed_config: str | None = Field(
        None, description="A DeepSpeed JSON file merged on top of the generated config (its keys win)."
    )
    ema: bool = Field(False, description="Keep an exponential moving average of the trained weights (ZeRO 0-2).")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay per optimizer step.")
    validation_every: int = Field(0, ge=0, description="Steps between validation videos (0: none).")
    validation_images: list[str] = Field(
        default_factory=list,
        description="Held-out first frames (URIs) for validation videos. Empty: first frames of the first "
        "train.validation_count samples of data.source.",
    )
    validation_prompts: list[str] = Field(
        default_factory=list,
        description="Text-to-video families (hotshot): prompts of the validation videos. Empty: the prompts of the "
        "first train.validation_count samples of data.source.",
    )
    validation_count: int = Field(2, ge=1, description="Validation videos when validation_images is empty.")
    validation_steps: int = Field(8, ge=1, description="Sampler steps of a validation video.")
    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.trainable == "patterns" and not self.trainable_patterns:
            raise ValueError("train.trainable_patterns: required when train.trainable=patterns")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("train.offload_params: needs train.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer: needs train.zero_stage >= 1")
        if self.ema and self.zero_stage == 3:
            raise ValueError("train.ema: not supported with train.zero_stage=3 (weights are sharded); use 0-2")
        return self


class FifoConfig(Section):
    partitions: int = Field(2, ge=1, description="n: windows the queue is split into; steps = n * frames.")
    lookahead: bool = Field(True, description="Lookahead denoising: overlapping half-shifted windows.")
    uniform_latents: bool = Field(
        False,
        description="Uniform latent extension (FIFO+ `unilatent`): queue slot i starts from base frame i // n "
        "instead of frame 0 for the first (n - 1) * window slots.",
    )
    cache: bool = Field(
        True,
        description="Cache base videos under <output>/cache, keyed by model, prompt, image, seed, window, "
        "partitions and size, so reruns and other lengths reuse them.",
    )


class ConsistencyConfig(Section):
    seed_frame: bool = Field(
        False,
        description="Re-condition on the first generated frame once it leaves the queue (image-conditioned "
        "models): the conditioning becomes (1 - w) * original + w * first frame.",
    )
    seed_frame_weight: float = Field(1.0, ge=0, le=1, description="w of generate.consistency.seed_frame.")
    qcache: bool = Field(
        False,
        description="Weighted query cache: temporal self-attention of each up block uses "
        "(1 - w) * q + w * q of its mirrored down block, within each UNet call.",
    )
    qcache_weight: float = Field(0.5, ge=0, le=1, description="w of generate.consistency.qcache.")


class AutoregressiveConfig(Section):
    overlap: int = Field(
        0,
        ge=0,
        description="Frames each clip shares with the previous one, blended linearly in latent space "
        "(0: clips are appended whole).",
    )
    num_inference_steps: int | None = Field(
        None, ge=1, description="Steps per clip. Unset: generate.num_inference_steps."
    )


class ControlConfig(Section):
    """ControlNet guidance (generate.controlnet, Hotshot-XL): where each video's control clip comes from and how it
    steers (vidgen.models.hotshot.control)."""

    source: Literal["clip", "path"] = Field(
        "clip", description="clip: the prompt row's own clip (an OPV2V scene's camera frames); path: the row's "
        "\"control\" field (a frame folder or video per JSONL row, relative to the prompt file)."
    )
    type: Literal["canny", "depth", "none"] = Field(
        "canny", description="canny: Canny edge maps computed from the clip's key frames (for a Canny ControlNet); "
        "depth: depth maps of the key frames from generate.control.depth_model (for a depth ControlNet); "
        "none: the clip's frames are the control maps already (precomputed depth, pose, segmentation ...)."
    )
    depth_model: str | None = Field(
        None, description="With type=depth: a transformers depth-estimation model directory, local or URI (DPT, "
        "Depth-Anything: config.json, weights, preprocessor_config.json)."
    )
    scale: float = Field(0.7, ge=0, description="ControlNet conditioning scale (Hotshot-XL's default 0.7; 0: off).")
    guidance_start: float = Field(0.0, ge=0, le=1, description="Fraction of the steps before the ControlNet acts.")
    guidance_end: float = Field(1.0, ge=0, le=1, description="Fraction of the steps after which it stops acting.")
    source_fps: float | None = Field(
        None, gt=0, description="Frame rate of the control clips (key frames span the video's duration, "
        "generate.num_frames / generate.fps). Unset: a video's own; frame folders as Hotshot-XL guesses (8 fps up "
        "to 16 frames, else about 14)."
    )
    canny_low: float = Field(100.0, ge=0, description="Canny's lower hysteresis threshold (diffusers' examples).")
    canny_high: float = Field(200.0, ge=0, description="Canny's upper threshold: stronger gradients start edges.")

    @model_validator(mode="after")
    def _window(self) -> ControlConfig:
        if self.guidance_start >= self.guidance_end:
            raise ValueError(f"generate.control.guidance_start={self.guidance_start} must be below "
                             f"generate.control.guidance_end={self.guidance_end}")
        if self.canny_low > self.canny_high:
            raise ValueError("generate.control.canny_low must not exceed generate.control.canny_high")
        if self.type == "depth" and not self.depth_model:
            raise ValueError("generate.control.depth_model: required with generate.control.type=depth (a "
                             "transformers depth-estimation model directory)")
        return self


class GenerateConfig(Section):
    prompts: str = Field(
        "",
        description="Prompt source: JSONL rows ({image, prompt, seed, id}), a text file (one prompt per line), "
        "VBench_full_info.json, an i2v file (`image_path;prompt` lines) or a folder of OPV2V scene folders. "
        "Relative image paths resolve from the prompt file's folder.",
    )
    prompt_format: Literal["auto", "jsonl", "text", "vbench", "i2v", "opv2v"] = Field(
        "auto",
        description="How to read generate.prompts. auto: .jsonl -> jsonl, .json -> vbench, a folder -> opv2v, "
        "a file whose every line is `image.png;prompt` -> i2v, else text.",
    )
    augmented_prompts: str | None = Field(
        None,
        description="Augmented prompt file line-aligned with a text prompts file (VBench augmented_prompts): "
        "videos are sampled with the augmented prompt and named by the original.",
    )
    dimensions: list[str] = Field(
        default_factory=list, description="VBench dimensions to keep (VBench JSON only). Empty: all."
    )
    images: str | None = Field(
        None, description="Conditioning image for text-only prompt sources (image-conditioned models such as SVD)."
    )
    samples_per_prompt: int = Field(1, ge=1, description="Videos per prompt (VBench: 5).")
    seed: int = Field(0, description="Sample i of a prompt uses seed + i (JSONL rows: their own seed + i).")
    seeds: list[int] = Field(
        default_factory=list, description="Explicit seed of sample i (overrides generate.seed); length >= samples."
    )
    naming: Literal["auto", "hash", "vbench"] = Field(
        "auto",
        description="Video file names. vbench: `{prompt}-{i}.mp4` (filename-safe); hash: `{id}-{hash}.mp4`; "
        "auto: vbench for VBench sources, else hash.",
    )
    extra_outputs: list[Literal["gif", "frames"]] = Field(
        default_factory=list, description="Besides the mp4: a gif under <output>/gif, PNG frames under <output>/frames."
    )
    output: str = Field("", description="Job folder: videos/, manifest.jsonl, records/. Unset: <workdir>/generated.")
    unet: str | None = Field(
        None, description="Trained UNet directory (from `vidgen train`) used instead of the model's own."
    )
    lora: str | None = Field(None, description="LoRA weights applied to the UNet (vidgen.models.lora.load_lora).")
    lora_scale: float = Field(1.0, description="Scale of generate.lora.")
    controlnet: str | None = Field(
        None, description="An SDXL ControlNet (a diffusers directory, local or URI; `tiny`: a random one for tests) "
        "steering Hotshot-XL frame by frame with the control clip of generate.control."
    )
    control: ControlConfig = Field(default_factory=ControlConfig)
    sampler: Literal["base", "fifo", "autoregressive"] = Field(
        "fifo", description="base: one window; fifo: diagonal denoising; autoregressive: clip after clip."
    )
    num_frames: int = Field(16, ge=1, description="Frames per output video (longer than the window: use fifo).")
    num_inference_steps: int = Field(
        8, ge=1, description="Denoising steps of the base sampler (FIFO uses partitions * window)."
    )
    fifo: FifoConfig = Field(default_factory=FifoConfig)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    autoregressive: AutoregressiveConfig = Field(default_factory=AutoregressiveConfig)
    min_guidance_scale: float = Field(1.0, ge=1, description="Classifier-free guidance at the first frame.")
    max_guidance_scale: float = Field(3.0, ge=1, description="Classifier-free guidance at the last frame.")
    fps: int = Field(7, ge=1, description="fps conditioning and output frame rate.")
    motion_bucket_id: int = Field(127, ge=0, le=255, description="SVD motion bucket conditioning.")
    noise_aug_strength: float = Field(0.02, ge=0, description="Noise added to the conditioning image.")
    height: int = Field(64, ge=8, description="Output height (multiple of 8).")
    width: int = Field(64, ge=8, description="Output width (multiple of 8).")
    num_actors: int = Field(1, ge=1, description="Most generation actors (the pool's max size).")
    min_actors: int | None = Field(None, ge=1, description="Fewest actors of the pool. Unset: num_actors.")
    use_gpu: bool = Field(False, description="GPUs per actor from generate.gpus_per_actor.")
    gpus_per_actor: float = Field(1.0, gt=0, description="GPUs per actor when generate.use_gpu.")
    actor_restarts: int = Field(
        -1, ge=-1, description="Restarts of a dead actor, its batch retried (-1: unlimited; 0: the job fails)."
    )
    max_failed_fraction: float = Field(
        0.05, ge=0, le=1, description="Stop with an error once more than this fraction of the videos failed."
    )

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        return multiple_of_8(v)

    @model_validator(mode="after")
    def _consistent(self) -> GenerateConfig:
        if self.seeds and len(self.seeds) < self.samples_per_prompt:
            raise ValueError(f"generate.seeds: {len(self.seeds)} seeds for samples_per_prompt="
                             f"{self.samples_per_prompt}; give at least one per sample")
        if self.min_actors and self.min_actors > self.num_actors:
            raise ValueError("generate.min_actors: must be <= generate.num_actors")
        return self


class EvalConfig(Section):
    real: str = Field("", description="Real clips (same layouts as `data`); unset: the data source.")
    generated: str = Field("", description="Directory of generated videos; unset: generate.output.")
    real_layout: Layout | None = Field(None, description="Layout of eval.real; unset: data.layout.")
    generated_layout: Literal["auto", "videos", "frames", "hotshot"] = Field(
        "videos", description="Layout of eval.generated (a generation output folder holds videos)."
    )
    num_frames: int = Field(16, ge=1, description="Frames per clip fed to I3D (both sets).")
    fps: float | None = Field(
        None, gt=0, description="Clip frame rate for both sets, strided from each source. Unset: every frame."
    )
    resolution: int = Field(224, ge=32, description="I3D input size R (224 for comparable numbers).")
    protocol: Literal["vidgen", "tf", "videogpt", "cd-fvd", "stylegan-v"] | None = Field(
        None,
        description="FVD protocol preset (vidgen.eval.protocols): every setting a published tool's number depends "
        "on, so results equal that tool's on the same weights and clips: tf (Google's original FVD), videogpt "
        "(VideoGPT), cd-fvd (content-debiased FVD's I3D path), stylegan-v (its TorchScript I3D as eval.i3d_path). "
        "Unset: vidgen (earlier vidgen defaults, equal to no published tool). The fields below override it.",
    )
    preprocess: Literal["squash", "squash_tf", "center_crop", "detector"] | None = Field(
        None,
        description="squash: bilinear straight to R x R (torch, as cd-fvd and TATS); squash_tf: TF1's legacy "
        "bilinear resize (TF FVD); center_crop: shorter side to R, then the centre R x R (VideoGPT); detector: "
        "the TorchScript model resizes (StyleGAN-V). Unset: the protocol's. Logged with the result.",
    )
    cov_norm: Literal["n-1", "n"] | None = Field(
        None, description="Covariance divisor: n-1 (TF-GAN, VideoGPT) or n (StyleGAN-V, cd-fvd). Unset: the "
        "protocol's. Logged."
    )
    matrix_sqrt: Literal["scipy", "svd"] | None = Field(
        None, description="Trace of the covariance product's root: scipy (sqrtm, StyleGAN-V, cd-fvd) or svd "
        "(TF-GAN's trace_sqrt_product, TF FVD, VideoGPT). Unset: the protocol's."
    )
    stats_precision: Literal["float64", "float32"] | None = Field(
        None, description="float64 statistics, or float32 (torch, as VideoGPT computes them). Unset: the protocol's."
    )
    bootstrap: int = Field(
        50, ge=0, description="Bootstrap resamples of the clips (features are computed once) for the FVD and KVD "
        "intervals: the range a rerun on a fresh draw of as many clips would fall in, 95%. 50 resamples of 2048 "
        "clips per set cost about 17 s on one core (FVD and KVD). Computed only where each set has at least as many "
        "clips as feature dimensions (400 for I3D, 1408 for VideoMAE-v2): below that the bootstrap spreads far "
        "wider than reruns do. 0: no intervals."
    )
    windows: list[Literal["early", "middle", "late"]] = Field(
        default_factory=lambda: ["early"],
        min_length=1,
        description="Where generated videos are cut into clips: early (first frames), middle, late (last "
        "frames); FVD/KVD are reported per window and over all windows' clips together.",
    )
    clips_per_real_video: int = Field(1, ge=1, description="Evenly spread clips taken from each real video.")
    features: Literal["i3d", "videomae"] = Field(
        "i3d", description="Feature network of FVD and KVD: i3d (Inception-I3D's 400 Kinetics logits, as every "
        "published FVD but cd-fvd's second variant) or videomae (VideoMAE-v2 ViT-g's 1408-d embedding, the content-"
        "debiased FVD of cd-fvd, which weighs motion more than I3D's logits do; 224 x 224 input only). The two are "
        "different metrics: compare numbers of one only. Each has its own real-set feature cache."
    )
    videomae_flavor: Literal["tiny", "pretrained"] = Field(
        "tiny", description="tiny: random init (tests, demo); pretrained: eval.videomae_path."
    )
    videomae_path: str | None = Field(
        None, description="VideoMAE-v2 ViT-g checkpoint (cd-fvd's vit_g_hybrid_pt_1200e_ssv2_ft.pth, its state "
        "dict under 'model' or 'module'), for eval.features=videomae."
    )
    i3d_flavor: Literal["tiny", "pretrained"] = Field("tiny", description="tiny: random init (tests, demo).")
    i3d_path: str | None = Field(None, description="I3D weights (a 400-class InceptionI3d state dict).")
    i3d_bn_eps: float | None = Field(
        None, gt=0, description="I3D BatchNorm epsilon: 1e-3 (TF, StyleGAN-V) or 1e-5 (the PyTorch port of VideoGPT, "
        "TATS, cd-fvd). Unset: the protocol's."
    )
    max_real: int = Field(2048, ge=2, description="At most this many real clips (the first by clip id).")
    min_clips: int = Field(400, ge=2, description="Warn when either set has fewer clips than this.")
    batch_size: int = Field(4, ge=1, description="Clips per I3D forward.")
    num_actors: int = Field(1, ge=1, description="I3D feature actors (one GPU each when eval.use_gpu).")
    use_gpu: bool = Field(
        False, description="One GPU reserved per I3D actor, which then runs on CUDA; false: the actors reserve none "
        "and run on the CPU, even on a GPU node (never guessed from the cluster: an autoscaler may have no GPU up)."
    )
    cache: bool = Field(True, description="Reuse the real set's features and statistics from eval.cache_dir.")
    cache_dir: str = Field(
        "",
        description="Real-set feature cache (npz + json per key of source, sampling, preprocessing, weights "
        "digest). Unset: <run.workdir>/eval-cache.",
    )

    @model_validator(mode="after")
    def _pretrained_needs_path(self) -> EvalConfig:
        if self.i3d_flavor == "pretrained" and not self.i3d_path:
            raise ValueError("eval.i3d_path: required when eval.i3d_flavor=pretrained")
        if self.features == "videomae":
            if self.videomae_flavor == "pretrained" and not self.videomae_path:
                raise ValueError("eval.videomae_path: required when eval.videomae_flavor=pretrained")
            if self.resolution != 224:
                raise ValueError(f"eval.resolution={self.resolution}: eval.features=videomae takes 224 x 224 clips "
                                 "only (VideoMAE-v2's positional grid is fixed); leave eval.resolution at 224")
            if self.num_frames < 2:
                raise ValueError(f"eval.num_frames={self.num_frames}: eval.features=videomae needs at least 2 "
                                 "frames (one tubelet); cd-fvd uses 16")
            if self.preprocess == "detector" or (self.preprocess is None and self.protocol == "stylegan-v"):
                raise ValueError("eval.features=videomae: eval.protocol=stylegan-v / eval.preprocess=detector is "
                                 "StyleGAN-V's TorchScript I3D; use eval.protocol=cd-fvd with VideoMAE features")
        return self


_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # safe in paths, MLflow tags and Ray submission ids


class NightlyConfig(Section):
    """The nightly eval (vidgen/eval/nightly.py): generate -> FVD/KVD -> compare with the last good night."""

    suite: str = Field(
        "default",
        description="Prompt-suite name (e.g. vbench-subject, opv2v-front); its prompts are generate.prompts and "
        "its real reference set eval.real. Tags the MLflow run, names the output folder and the Ray "
        "submission id nightly-<suite>-<date>.",
    )
    date: str | None = Field(
        None, description="The night, YYYY-MM-DD. Unset: today's UTC date. A rerun with the same date resumes "
        "that night's MLflow run and output folder instead of starting another.",
    )
    checkpoints: dict[str, str] = Field(
        default_factory=dict,
        description="Checkpoints to evaluate: label -> trained UNet directory ('' for the model's own UNet). "
        "One MLflow run each, compared with the same label's last good night. Empty: one run labelled "
        "'default' with generate.unet.",
    )
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {"fvd": 0.10, "kvd": 0.25},
        description="Per judged metric, the smallest relative change for the worse against the last good night "
        "that counts as a regression (0.1: 10% worse); metrics not listed are reported, not judged. When both "
        "nights carry the metric's bootstrap interval (eval.bootstrap > 0), tonight's value must also lie beyond "
        "the baseline's interval and the baseline's beyond tonight's, so noise is not flagged (0: the intervals "
        "alone judge). Without intervals the threshold alone judges. A judged metric NaN or missing tonight "
        "regresses.",
    )
    higher_is_better: list[str] = Field(
        default_factory=list,
        description="Metrics for which larger is better, beyond those vidgen knows (temporal_flickering_score); "
        "FVD, KVD, the flicker MAE and unknown metrics are lower-is-better, motion_magnitude is descriptive.",
    )
    output: str = Field(
        "", description="Root of the nightly outputs: <output>/<suite>/<date>/<label>/ holds the videos and the "
        "report. Unset: <workdir>/nightly.",
    )
    gallery: int = Field(8, ge=0, description="Sample videos shown in the report (copied beside it).")
    history: int = Field(30, ge=2, description="Nights shown in the report's FVD trend plot.")

    @field_validator("date", mode="before")
    @classmethod
    def _iso_date(cls, v: Any) -> str | None:
        if isinstance(v, datetime.date):  # YAML reads an unquoted 2026-01-31 as a date
            v = v.isoformat()
        if v is not None and not isinstance(v, str):
            raise ValueError(f"expected a date YYYY-MM-DD, got {v!r}")
        if v is not None and not (re.fullmatch(r"\d{4}-\d{2}-\d{2}", v) and _parses(datetime.date.fromisoformat, v)):
            raise ValueError(f"expected a date YYYY-MM-DD, got {v!r}")
        return v

    @field_validator("suite", "checkpoints")
    @classmethod
    def _names(cls, v: Any) -> Any:
        bad = [k for k in ([v] if isinstance(v, str) else v) if not re.fullmatch(_NAME, k)]
        if bad:
            raise ValueError(f"{bad[0]!r}: expected letters, digits, '_', '.', '-' (starting with a letter or digit)")
        return v

    @field_validator("thresholds")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not x >= 0]
        if bad:
            raise ValueError(f"{bad[0]}={v[bad[0]]}: expected a relative threshold >= 0")
        return v


def _parses(fn, v: str) -> bool:
    try:
        fn(v)
    except ValueError:
        return False
    return True


class LatentsConfig(Section):
    """`vidgen prepare latents`: encode clips once with the recipe's frozen encoders into a cache of shards."""

    output: str | None = Field(
        None, description="Where the cache is written (local path or URI). Unset: <run.workdir>/latents."
    )
    shard_size: int = Field(64, ge=1, description="Clips per shard; a killed job redoes at most the unfinished ones.")
    batch_size: int = Field(4, ge=1, description="Clips per encoder forward.")
    actors: int = Field(1, ge=1, description="Encoder actors (latents.gpus_per_actor GPUs each).")
    gpus_per_actor: float = Field(
        0.0, ge=0, description="GPUs each encoder actor reserves (e.g. 1); > 0: the encoders run on CUDA, 0: on the "
        "CPU, even on a GPU node (never guessed from the cluster: an autoscaler may have no GPU up)."
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Encoder compute dtype; the cache stores fp32 (a dtype change changes the cache key)."
    )


class VidgenConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    nightly: NightlyConfig = Field(default_factory=NightlyConfig)
    latents: LatentsConfig = Field(default_factory=LatentsConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading


MAX_CONFIG_BYTES = 1 << 20  # real configs are a few KiB; parsing a huge file would only stall the job
MAX_CONFIG_VALUES = 100_000  # after alias expansion: a "billion laughs" file is small and expands without end


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int):
        super().__init__(f"duplicate key {key!r} at line {again} (first at line {first})")
        self.key, self.first, self.again = key, first, again


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a mapping that holds a key twice is an error (PyYAML keeps the last silently).
    Keys a merge (`<<: *anchor`) brings in may be overridden, as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise _DuplicateKey(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    break
        return super().construct_mapping(node, deep)


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes, more than a config can be "
                              f"({MAX_CONFIG_BYTES // 1024} KiB); is this the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds plain data only
    except _DuplicateKey as e:
        raise ConfigError(f"{path}:{e.again}: duplicate key {e.key!r} (first at line {e.first}); a key may "
                          "appear once per section") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    if _expanded_size(data, {}) > MAX_CONFIG_VALUES:  # anchors and aliases are shared until something copies them
        raise ConfigError(f"{path}: its YAML aliases expand to more than {MAX_CONFIG_VALUES} values (or refer to "
                          "themselves); a config needs far fewer")
    return data


def _expanded_size(obj: Any, memo: dict[int, int]) -> int:
    """How many values `obj` holds once every alias is copied out: O(distinct objects) via `memo`. An object
    that contains itself counts as too many (it is marked as such while its children are counted)."""
    if not isinstance(obj, dict | list):
        return 1
    if id(obj) in memo:
        return memo[id(obj)]
    memo[id(obj)] = MAX_CONFIG_VALUES + 1
    children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
    total = 1
    for child in children:
        total += _expanded_size(child, memo)
        if total > MAX_CONFIG_VALUES:
            break
    memo[id(obj)] = total
    return total


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001). Values are YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError):  # ValueError: a date-shaped value that is no date (2026-02-30)
        value = raw  # let the field's validator judge the raw string
    if isinstance(value, datetime.date):
        value = raw.strip()  # dates stay the text the user typed
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads `1e-4` as a string; a number was meant
    return key.split("."), value


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return any(c.isdigit() for c in s)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = _comma_list(path, value)
    return data


def _comma_list(path: list[str], value: Any) -> Any:
    """`key=a,b,c` for a list-typed key is the list [a, b, c] (`key=` the empty list); other values unchanged."""
    model: Any = VidgenConfig
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return value
        model = field.annotation
    if typing.get_origin(model) is not list or not isinstance(value, str | int | float) or isinstance(value, bool):
        return value
    text = str(value).strip()
    return [item.strip() for item in text.split(",")] if text else []


def _fix_yaml_floats(node: Any) -> Any:
    """PyYAML reads `1e-5` (no dot) as a string; turn such strings back into numbers."""
    if isinstance(node, dict):
        return {k: _fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_numeric(node) and "e" in node.lower():
        return float(node)
    return node


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def _describe(err: dict[str, Any]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        options = [o.strip().strip("'") for o in expected.replace(" or ", ", ").split(",")]
        return "expected one of " + ", ".join(o for o in options if o)
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        word = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "")
        shown = f"{bound:g}" if isinstance(bound, int | float) else bound
        return f"expected a number {word} {shown}"
    if kind.startswith("int_"):
        return "expected an integer"
    if kind.startswith("float_"):
        return "expected a number"
    if kind.startswith("bool_"):
        return "expected true or false"
    if kind.startswith("string_"):
        return "expected a string"
    if kind == "list_type":
        return "expected a list: key=a,b,c on the command line, [a, b, c] in YAML"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "expected a section (a mapping of keys)"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        key = ".".join(loc) or "<root>"
        value = err.get("input")
        shown = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(VidgenConfig, err["loc"])
            section = ".".join(loc[:-1]) or "the top level"
            lines.append(f"{key}: unknown key; allowed under {section}: {', '.join(allowed)}")
        elif err["type"] == "value_error" and len(loc) <= 1:  # section-level checks name their key
            lines.append(_describe(err))
        else:
            lines.append(f"{key}={shown}: {_describe(err)}")
    prefix = f"{source}: " if source else ""
    return prefix + "; ".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> VidgenConfig:
    """Defaults <- YAML file <- `key=value` overrides, validated as a whole."""
    data = _fix_yaml_floats(_read_yaml(path)) if path else {}
    data = apply_overrides(data, list(overrides or []))
    try:
        return VidgenConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path) if path else "")) from None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1}} -> {'train.lr': 1}: MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
