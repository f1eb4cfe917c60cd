"""Job configs: pydantic models, YAML loading and dotted `key=value` overrides.

One root model, `VidgenConfig`, describes every job; `vidgen train` reads `run`, `data`, `model`,
`train`; `vidgen generate` reads `model` and `generate`; `vidgen eval` reads `eval`. A config file
only states what differs from the defaults below, and a run logs the fully resolved config, so any
run can be repeated from its logged YAML.

Bad input never surfaces as a pydantic traceback: `load_config` raises `ConfigError` with one line
per problem, e.g. ``train.zero_stage=7: expected one of 0, 1, 2, 3``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vidgen.errors import ConfigError


class Section(BaseModel):
    """A config section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("vidgen", description="Run name: MLflow run name and Ray Train experiment name.")
    workdir: str = Field(
        "./work", description="Local or fsspec URI under which every output of the run is written."
    )
    seed: int = Field(0, description="Base seed; workers and actors derive their own from it.")


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
    num_frames: int = Field(8, ge=1, description="Frames per clip.")
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
        "nearest bucket instead of height x width. Unset: every clip is height x width.",
    )
    camera: int = Field(0, ge=0, le=3, description="OPV2V camera (0 front, 1 right-rear, 2 left-rear, 3 back).")
    prompt_template: str = Field(
        "a front camera driving video, {scenario}",
        description="OPV2V prompt; {scenario}, {split}, {cav} are filled in per sample.",
    )
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the job when more than this fraction of samples is skipped."
    )

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError("must be a multiple of 8 (the VAE downsamples by 8)")
        return v


class ModelConfig(Section):
    family: Literal["svd"] = Field("svd", description="Model family.")
    flavor: Literal["tiny", "pretrained"] = Field(
        "tiny", description="tiny: random init from a small config (tests, demo); pretrained: load `path`."
    )
    path: str | None = Field(
        None,
        description="Diffusers-format model directory (local path or fsspec URI). Never downloaded from a hub.",
    )
    cache_dir: str = Field(
        "~/.cache/vidgen/models", description="Where remote model directories are copied once, keyed by URI."
    )
    num_frames: int = Field(8, ge=2, description="The model's frame window (frames per UNet call).")

    @model_validator(mode="after")
    def _pretrained_needs_path(self) -> ModelConfig:
        if self.flavor == "pretrained" and not self.path:
            raise ValueError(
                "model.path: required when model.flavor=pretrained (a local diffusers directory or URI)"
            )
        return self


class TrainConfig(Section):
    recipe: Literal["svd_full"] = Field("svd_full", description="What trains and with which objective.")
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
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
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
        None, description="Where Ray Train keeps checkpoints (shared storage on clusters). Unset: <workdir>/train."
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
    validation_count: int = Field(2, ge=1, description="Validation videos when validation_images is empty.")
    validation_steps: int = Field(8, ge=1, description="Sampler steps of a validation video.")
    # EDM objective of SVD (SVD Xtend's constants): sigma ~ LogNormal(p_mean, p_std).
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


class GenerateConfig(Section):
    prompts: str = Field(
        "", description="Prompt file (JSONL rows with `image` and optional `prompt`, `seed`, `id`)."
    )
    output: str = Field("", description="Where videos go. Unset: <workdir>/generated.")
    unet: str | None = Field(
        None, description="Trained UNet directory (from `vidgen train`) used instead of the model's own."
    )
    sampler: Literal["base", "fifo"] = Field("fifo", description="base: one window; fifo: diagonal denoising.")
    num_frames: int = Field(16, ge=1, description="Frames per output video (longer than the window: use fifo).")
    num_inference_steps: int = Field(
        8, ge=1, description="Denoising steps of the base sampler (FIFO uses partitions * window)."
    )
    fifo: FifoConfig = Field(default_factory=FifoConfig)
    min_guidance_scale: float = Field(1.0, ge=1, description="Classifier-free guidance at the first frame.")
    max_guidance_scale: float = Field(3.0, ge=1, description="Classifier-free guidance at the last frame.")
    fps: int = Field(7, ge=1, description="fps conditioning and output frame rate.")
    motion_bucket_id: int = Field(127, ge=0, le=255, description="SVD motion bucket conditioning.")
    noise_aug_strength: float = Field(0.02, ge=0, description="Noise added to the conditioning image.")
    height: int = Field(64, ge=8, description="Output height (multiple of 8).")
    width: int = Field(64, ge=8, description="Output width (multiple of 8).")
    num_actors: int = Field(1, ge=1, description="Generation actors (one GPU each on a GPU cluster).")
    use_gpu: bool = Field(False, description="One GPU per actor.")


class EvalConfig(Section):
    real: str = Field("", description="Real clips (same layouts as `data`); unset: the data source.")
    generated: str = Field("", description="Directory of generated videos; unset: generate.output.")
    num_frames: int = Field(16, ge=1, description="Frames per clip fed to I3D (both sets).")
    resolution: int = Field(224, ge=32, description="I3D input size; frames are resized straight to it.")
    i3d_flavor: Literal["tiny", "pretrained"] = Field("tiny", description="tiny: random init (tests, demo).")
    i3d_path: str | None = Field(None, description="I3D weights (a 400-class InceptionI3d state dict).")
    max_real: int = Field(2048, ge=2, description="At most this many real clips.")
    batch_size: int = Field(4, ge=1, description="Clips per I3D forward.")

    @model_validator(mode="after")
    def _pretrained_needs_path(self) -> EvalConfig:
        if self.i3d_flavor == "pretrained" and not self.i3d_path:
            raise ValueError("eval.i3d_path: required when eval.i3d_flavor=pretrained")
        return self


class VidgenConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config file ({e})") from None
    try:
        data = yaml.safe_load(text)
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
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (['train', 'lr'], 0.0001). Values are YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # let the field's validator judge the raw string
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
        node[path[-1]] = value
    return data


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
