"""Config validation, YAML loading and dotted overrides."""

from __future__ import annotations

import pytest

from vidgen.config import VidgenConfig, flatten, load_config, parse_override
from vidgen.errors import ConfigError


def write(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_overrides_coerce_types_and_create_nested_keys(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-5\n"), [
        "train.lr=3e-4", "train.use_gpu=true", "generate.fifo.partitions=3", "model.num_frames=14",
        "data.source=s3://bucket/clips", "data.fps=7",
    ])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.use_gpu is True
    assert cfg.generate.fifo.partitions == 3
    assert cfg.model.num_frames == 14
    assert cfg.data.source == "s3://bucket/clips"
    assert cfg.data.fps == 7.0


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-5` as a string; configs mean a number.
    assert load_config(write(tmp_path, "train:\n  lr: 1e-5\n")).train.lr == pytest.approx(1e-5)


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=7", "train.zero_stage=7: expected one of 0, 1, 2, 3"),
    ("train.precision=fp8", "train.precision=fp8: expected one of fp32, bf16, fp16"),
    ("train.lr=-1", "train.lr=-1: expected a number > 0"),
    ("train.num_workers=two", "train.num_workers=two: expected an integer"),
    ("train.use_gpu=maybe", "train.use_gpu=maybe: expected true or false"),
    ("data.height=60", "data.height=60: must be a multiple of 8 (the VAE downsamples by 8); nearest: 56 or 64"),
    ("generate.height=65", "generate.height=65: must be a multiple of 8 (the VAE downsamples by 8); nearest: 64 or 72"),
    ("generate.width=12", "generate.width=12: must be a multiple of 8 (the VAE downsamples by 8); nearest: 8 or 16"),
    ("generate.sampler=ddim", "generate.sampler=ddim: expected one of base, fifo, autoregressive"),
])
def test_bad_values_name_key_value_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == message
    assert "\n" not in str(e.value)


def test_bad_buckets_are_refused_at_load_naming_the_key_and_the_forms(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.buckets=512by320"])
    assert str(e.value) == ("data.buckets=512by320: '512by320' in '512by320' is not WxH; expected a preset "
                            "(hotshot-512, svd) or a list like '512x320,320x512'")
    with pytest.raises(ConfigError, match=r"c.yaml: data.buckets=500x320: 500x320 \(WxH\) must be .* multiples of 8"):
        load_config(write(tmp_path, "data:\n  buckets: 500x320\n"))
    assert load_config(None, ["data.buckets=hotshot-512"]).data.buckets == "hotshot-512"  # kept as written
    assert load_config(None, ["data.buckets=64x32,96x64"]).data.largest_size() == (64, 96)


def test_unknown_keys_list_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: train.zero: unknown key; allowed under train: .*zero_stage"):
        load_config(write(tmp_path, "train:\n  zero: 2\n"))
    with pytest.raises(ConfigError, match=r"trian: unknown key; allowed under the top level: data, eval"):
        load_config(None, ["trian.lr=1"])


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1e-4\n  zero_stage: [2\nmodel:\n  flavor: tiny\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4:\d+: YAML syntax error"):
        load_config(p)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="a value, not a section"):
        load_config(write(tmp_path, "train:\n  lr: 1e-4\n"), ["train.lr.x=1"])
    with pytest.raises(ConfigError, match=r"train.lr=\{x: 1\}: expected a number"):
        load_config(None, ["train.lr.x=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("train.lr")


def test_pretrained_flavors_need_a_path():
    with pytest.raises(ConfigError, match="model.path: required when model.flavor=pretrained"):
        load_config(None, ["model.flavor=pretrained"])
    assert load_config(None, ["model.flavor=pretrained", "model.path=/w/svd"]).model.path == "/w/svd"
    with pytest.raises(ConfigError, match="eval.i3d_path: required"):
        load_config(None, ["eval.i3d_flavor=pretrained"])


def test_flatten_gives_dotted_params():
    flat = flatten(VidgenConfig().to_dict())
    assert flat["train.zero_stage"] == 2
    assert flat["generate.fifo.lookahead"] is True
    assert not any(isinstance(v, dict) for v in flat.values())


def test_every_field_explains_itself():
    def walk(model):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, VidgenConfig.__mro__[1]):
                yield from walk(ann)
            else:
                yield f"{model.__name__}.{name}", field.description
    missing = [name for name, desc in walk(VidgenConfig) if not desc]
    assert not missing, f"fields without a description: {missing}"
