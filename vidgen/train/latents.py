"""`vidgen prepare latents`: encode every clip once with the recipe's frozen encoders; training reads the cache.

Shapes: B batch, F frames, C latent channels, H/W pixels, h/w latents, S text tokens, D/P embedding widths.

What a clip becomes is the recipe's `encode(batch)` (deterministic: VAE posterior parameters, not a sample, so
the training generator draws the same latents from the cache as on the fly):
  svd_*:    latent_params fp32 [F, 2C, h, w], image_embeds fp32 [1, D], first_frame uint8 [H, W, 3],
            cond_latent fp32 [C, h, w] (clean first frame; the loss re-encodes the noise-augmented frame)
  hotshot:  latent_params fp32 [F, 2C, h, w], prompt_embeds fp32 [S, D], pooled_embeds fp32 [P]
  wan_*:    latents fp32 [L, C, h, w] (the normalised posterior mean the recipe trains on: L = (F - 1) / 4 + 1 latent
            frames), prompt_embeds fp32 [S, D] (UMT5; the empty prompt for clips without one)
plus the clip's fps, prompt, clip_id and SDXL geometry (orig_height, orig_width, crop_top, crop_left).

Layout under the cache root: `part-NNNNN.parquet` (one row per clip; each tensor as raw little-endian bytes in
a binary column with its shape in `<name>_shape`), `part-NNNNN.done.json` (written after the atomic shard write:
the resume marker), `_latents.json` (the key) and `_manifest.json` (shards and clip counts, written last).
Shard k holds the clips of samples [k * m, (k + 1) * m) (the listing is sorted), as `vidgen prepare pack` does,
so a rerun redoes exactly the shards without a done marker. Clips are read with train=False: evenly spread
starts and centre crops, so the cache is reproducible (training from it sees the same clips every epoch).

The key holds every config field that changes what is stored (model.family first: another family's cache is never
read), and the sha256 of the encoders' weights (tensor bytes, hashed once per actor); a training run or a rerun
with a differing field is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter

import numpy as np

from vidgen import faults, storage
from vidgen.config import VidgenConfig
from vidgen.data.listing import Sample
from vidgen.data.pack import done_uri, shard_name
from vidgen.data.pipeline import check_bad_fraction, read_config_clips
from vidgen.data.worker import BadSample, ClipSpec, sample_clips
from vidgen.devices import compute_device
from vidgen.errors import ConfigError, DataError
from vidgen.models import registry
from vidgen.ray_env import FOREGROUND_ENV, data_task_args
from vidgen.train.preflight import check_data

log = logging.getLogger(__name__)

KEY_FILE, MANIFEST = "_latents.json", "_manifest.json"
FORMAT = 1
META = ("clip_id", "prompt", "fps", "orig_height", "orig_width", "crop_top", "crop_left")


def cache_uri(cfg: VidgenConfig) -> str:
    return cfg.latents.output or storage.join(cfg.run.workdir, "latents")


def config_key(cfg: VidgenConfig) -> dict:
    """The config fields a cache depends on, by their dotted names (the refusal message names them)."""
    d, m = cfg.data, cfg.model
    return {"format": FORMAT, "model.family": m.family, "model.flavor": m.flavor, "model.path": m.path,
            "model.num_frames": m.num_frames, "data.source": d.source, "data.layout": d.layout,
            "data.height": None if d.buckets else d.height, "data.width": None if d.buckets else d.width,
            "data.buckets": d.buckets, "data.fps": d.fps, "data.source_fps": d.source_fps,
            "data.clips_per_video": d.clips_per_video, "data.camera": d.camera,
            "data.prompt_template": d.prompt_template, "data.default_prompt": d.default_prompt,
            "latents.dtype": cfg.latents.dtype, "run.seed": cfg.run.seed if m.flavor == "tiny" else None,
            **registry.spec(m).cache_key(cfg)}


def weights_hash(modules) -> str:
    """sha256 over the encoders' tensors (names, shapes, dtypes, bytes): ~1 GB/s, seconds for SVD or SDXL."""
    import torch  # lazy: importing latents does not load torch

    h = hashlib.sha256()
    for module in modules:
        for name, t in module.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def differing(expected: dict, found: dict) -> list[str]:
    return [k for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]


def refuse(uri: str, expected: dict, found: dict, what: str) -> None:
    """One line naming the first differing field (and how many more), or nothing when the keys agree."""
    diff = sorted(differing(expected, found), key=lambda k: k != "model.family")  # another family's: said first
    if not diff:
        return
    k = diff[0]
    more = f" (and {len(diff) - 1} more: {', '.join(diff[1:4])})" if len(diff) > 1 else ""
    raise ConfigError(f"data.latents={uri}: the cache was written with {k}={found.get(k)!r}, {what} has "
                      f"{k}={expected.get(k)!r}{more}; run `vidgen prepare latents` with this config")


# ---- writing ------------------------------------------------------------------------------------------


def _to_row(clip: dict, encoded: dict[str, np.ndarray], i: int) -> dict:
    row = {k: clip[k] for k in META if k in clip}
    for name, batch in encoded.items():
        a = np.ascontiguousarray(batch[i])
        row[name], row[f"{name}_shape"] = a.tobytes(), list(a.shape)
    return row


def non_finite(encoded: dict[str, np.ndarray], i: int) -> tuple[str, int] | None:
    """(the first tensor of clip i holding NaN or inf, how many such values), or None when all are finite."""
    for name, batch in encoded.items():
        a = batch[i]
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return name, int(a.size - np.isfinite(a).sum())
    return None


def encode_shard(recipe, out: str, index: int, samples: list[Sample], spec: ClipSpec, batch_size: int,
                 fault: str | None = None, finished: int = 0) -> dict:
    """Decode, encode and write shard `index` atomically, then its done marker; returns the marker.

    A sample whose clips cannot be decoded, or any of whose encodings holds NaN or inf (an encoder overflowing
    in low precision), is left out of the shard and recorded in the marker's `bad` list, as a decode failure
    is: nothing non-finite is ever cached, and data.max_bad_fraction stops a job where it is systematic."""
    import pyarrow as pa  # lazy: importing latents loads neither pyarrow nor torch
    import pyarrow.parquet as pq
    import torch

    clips, bad = [], []
    for sample in samples:
        try:
            clips.extend({**c, "_uri": sample.uri} for c in sample_clips(sample, spec))
        except BadSample as e:
            bad.append({"uri": sample.uri, "reason": e.reason, "detail": e.detail})
        except Exception as e:  # an unforeseen input: recorded, never fatal (as in read_clips)
            log.warning("unexpected error on %s", sample.uri, exc_info=True)
            bad.append({"uri": sample.uri, "reason": f"unexpected {type(e).__name__}",
                        "detail": f"{sample.uri}: {e}"[:500]})
    encoded_rows: list[tuple[str, dict]] = []  # (sample uri, row)
    nan_uris: set[str] = set()
    for start in range(0, len(clips), batch_size):
        group = clips[start:start + batch_size]
        sizes = {c["frames"].shape for c in group}
        for shape in sorted(sizes):  # buckets: one encoder call per frame size
            part = [c for c in group if c["frames"].shape == shape]
            batch = {"frames": torch.from_numpy(np.stack([c["frames"] for c in part]))}
            if "prompt" in part[0]:
                batch["prompt"] = [c["prompt"] for c in part]
            encoded = {k: v.cpu().numpy() for k, v in recipe.encode(batch).items()}
            for i, c in enumerate(part):
                found = non_finite(encoded, i)
                if found is None:
                    encoded_rows.append((c["_uri"], _to_row(c, encoded, i)))
                elif c["_uri"] not in nan_uris:
                    nan_uris.add(c["_uri"])
                    detail = (f"shard {shard_name(index)}: clip {c.get('clip_id', c['_uri'])}: {found[0]} holds "
                              f"{found[1]} NaN/inf values (an encoder overflow; latents.dtype=fp32 avoids it)")
                    log.warning("%s", detail)
                    bad.append({"uri": c["_uri"], "reason": "non-finite encoding", "detail": detail})
        # test hook (vidgen/faults.py): `finished` shards written by this process, this one encoded, none written
        faults.maybe_exit("LATENTS", fault, finished)
    rows = [r for uri, r in encoded_rows if uri not in nan_uris]  # a sample is cached whole or not at all
    with storage.atomic_local(storage.join(out, shard_name(index)), ".parquet") as path:
        pq.write_table(pa.Table.from_pylist(rows), path) if rows else open(path, "wb").close()
    done = {"clips": len(rows), "bad": bad}
    storage.write_json(done_uri(out, index), done)
    return done


def upcast_vae(module, dtype) -> bool:
    """True when `module` is a VAE that must stay fp32 under `dtype`=fp16: its config declares force_upcast
    (SDXL's and SVD's do), because its activations overflow fp16 to inf/NaN; diffusers' pipelines upcast it too."""
    import torch  # lazy: importing latents does not load torch

    config = getattr(module, "config", None)
    return dtype == torch.float16 and bool(getattr(config, "force_upcast", False))


def load_encoders(cfg: VidgenConfig, gpus_reserved: float = 0.0):
    """(the recipe, the sha256 of its encoders' weights), encoders in latents.dtype on CUDA when this process
    reserved GPUs (`gpus_reserved` > 0), else on the CPU: never on a GPU that is merely visible."""
    import torch  # lazy: importing latents does not load torch

    recipe = registry.build_recipe(cfg.model, cfg.train, cfg.run.seed)
    digest = weights_hash(recipe.encoders())
    device = compute_device(gpus_reserved, "latents.gpus_per_actor")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.latents.dtype]  # fp32: as built
    for m in recipe.encoders():
        if upcast_vae(m, dtype):
            log.info("latents.dtype=fp16: the VAE stays fp32 (its config says force_upcast: fp16 overflows it "
                     "to NaN); the other encoders run in fp16")
            m.to(device=device)
        else:
            m.to(device=device, dtype=dtype)
    return recipe, digest


class ShardEncoder:
    """A Ray Data actor: builds the recipe's frozen encoders once (on CUDA when it reserved GPUs, passed in as
    `gpus_reserved`, the same number as its num_gpus), then writes every shard it is handed."""

    def __init__(self, cfg_dict: dict, out: str, spec: ClipSpec, key_hash: str, table_ref: list, per_shard: int,
                 gpus_reserved: float = 0.0, fault: str | None = None):
        import ray  # lazy: importing latents does not load ray

        self.cfg = VidgenConfig(**cfg_dict)
        self.table, self.per_shard = ray.get(table_ref[0]), per_shard  # the listing, shipped once (a list: unresolved)
        self.recipe, found = load_encoders(self.cfg, gpus_reserved)
        if found != key_hash:
            raise DataError(f"{out}: the encoders on this worker differ from the driver's (weights hash): "
                            "is model.path the same on every node?")
        self.out, self.spec = out, spec
        self.fault, self.written = fault, 0

    def __call__(self, batch: dict) -> dict:
        marks = []
        for index in batch["index"]:
            samples = list(self.table[int(index) * self.per_shard:(int(index) + 1) * self.per_shard])
            done = encode_shard(self.recipe, self.out, int(index), samples, self.spec,
                                self.cfg.latents.batch_size, self.fault, self.written)
            self.written += 1
            marks.append(json.dumps(done))
        return {"index": batch["index"], "done": marks}


def prepare_latents(cfg: VidgenConfig, use_ray: bool = True, progress=None) -> dict:
    """Write (or complete) the cache of `cfg` at `cache_uri(cfg)`; returns its manifest.

    use_ray: encode in a Ray Data actor pool (latents.actors actors, latents.gpus_per_actor GPUs each; Ray
    must be running). False: in this process (small datasets, tests), on CUDA when latents.gpus_per_actor > 0."""
    t0 = time.perf_counter()
    d, lat = cfg.data, cfg.latents
    if not d.source:
        raise ConfigError("data.source: required for prepare latents (the clips to encode)")
    registry.spec(cfg.model).check_train(cfg)  # sizes and frame counts the family cannot encode
    out = cache_uri(cfg)
    stream = read_config_clips(cfg, train=False)
    check_data(cfg, stream, job="encoding")  # before the encoders load: data provably over the limit is refused
    # with Ray the driver only hashes the weights (the actors encode), so it never takes a GPU
    from vidgen.models.attention import portable  # lazy: torch, imported by the job, not by this module

    # With Ray the driver builds the encoders only to hash their weights: with a kernel it can run (no CUDA on a
    # head); the actors compute with model.attention as configured.
    driver_cfg = cfg.model_copy(update={"model": portable(cfg.model)}) if use_ray else cfg
    recipe, digest = load_encoders(driver_cfg, 0.0 if use_ray else lat.gpus_per_actor)
    key = {**config_key(cfg), "encoders": digest,
           "samples": hashlib.sha256("\n".join(stream.samples.uri(i) for i in range(len(stream.samples)))
                                     .encode("utf-8", "surrogateescape")).hexdigest()}
    key_uri = storage.join(out, KEY_FILE)
    if storage.exists(key_uri):
        refuse(out, key, json.loads(storage.read_text(key_uri)), "this config")
    else:
        storage.makedirs(out)
        storage.write_json(key_uri, key)

    per_shard = max(1, lat.shard_size // max(1, d.clips_per_video))
    groups = [stream.samples[i:i + per_shard] for i in range(0, len(stream.samples), per_shard)]
    markers = [done_uri(out, k) for k in range(len(groups))]
    pending = [k for k in range(len(groups)) if not storage.exists(markers[k])]
    log.info("prepare latents %s -> %s: %d shards, %d to write", d.source, out, len(groups), len(pending))
    if pending and use_ray:
        import ray  # lazy: importing latents does not load ray

        if not ray.is_initialized():
            raise ConfigError("prepare latents: needs a running Ray (ray.init or RAY_ADDRESS)")
        gpus = lat.gpus_per_actor  # configured, not read off the cluster: an autoscaler may have no GPU up yet
        items = [{"index": k} for k in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(ShardEncoder, batch_size=1, concurrency=lat.actors, num_gpus=gpus, num_cpus=1,
                            runtime_env={"env_vars": FOREGROUND_ENV},  # the job waits on these actors
                            fn_constructor_args=(cfg.model_dump(mode="json"), out, stream.spec, key["encoders"],
                                                 [ray.put(stream.samples)], per_shard, gpus),
                            fn_constructor_kwargs={"fault": faults.from_env("LATENTS")})
        for n, row in enumerate(ds.iter_rows(), 1):
            if progress:
                progress(n, len(pending), int(row["index"]))
    elif pending:
        fault = faults.from_env("LATENTS")
        for n, k in enumerate(pending):
            encode_shard(recipe, out, k, groups[k], stream.spec, lat.batch_size, fault, n)
            if progress:
                progress(n + 1, len(pending), k)

    done = [json.loads(storage.read_text(u)) for u in markers]
    bad = sorted((b for x in done for b in x["bad"]), key=lambda b: b["uri"])
    report = {"total": len(stream.samples), "skipped": len(bad),
              "reasons": dict(Counter(b["reason"] for b in bad).most_common()), "bad": bad}
    manifest = {"shards": [{"name": shard_name(k), "clips": x["clips"]} for k, x in enumerate(done)],
                "clips": sum(x["clips"] for x in done), "written": len(pending),
                "existing": len(groups) - len(pending), "report": report, "key": key,
                "seconds": round(time.perf_counter() - t0, 2)}
    storage.write_json(storage.join(out, MANIFEST), manifest)
    check_bad_fraction(report, d.max_bad_fraction)
    return manifest


# ---- reading --------------------------------------------------------------------------------------------


def open_cache(cfg: VidgenConfig) -> dict:
    """The manifest of the cache at data.latents, after checking its key against `cfg` (one-line refusal)."""
    uri = cfg.data.latents
    for name in (KEY_FILE, MANIFEST):
        if not storage.exists(storage.join(uri, name)):
            raise ConfigError(f"data.latents={uri}: no {name} there; write the cache with "
                              "`vidgen prepare latents` (an unfinished one lacks _manifest.json: rerun it)")
    manifest = json.loads(storage.read_text(storage.join(uri, MANIFEST)))
    expected = config_key(cfg)
    # a field another family's key has, unset in this one's (older caches carry it as null)
    found = {k: v for k, v in manifest["key"].items()
             if k not in ("encoders", "samples") and (v is not None or k in expected)}
    expected.pop("data.source"), found.pop("data.source", None)  # the cache stands in for the source
    refuse(uri, expected, found, "this config")
    return manifest


def decode_row(row: dict) -> dict:
    """A cache row -> numpy arrays (and the metadata as is)."""
    out = {}
    for k, v in row.items():
        if k.endswith("_shape"):
            continue
        if f"{k}_shape" in row:
            dtype = np.uint8 if k == "first_frame" else np.float32
            out[k] = np.frombuffer(v, dtype=dtype).reshape(row[f"{k}_shape"])
        else:
            out[k] = v
    return out


def read_rows(uri: str, manifest: dict):
    """Every cached row, decoded, in shard order, without Ray (tests, validation inputs)."""
    import pyarrow.parquet as pq  # lazy: importing latents does not load pyarrow

    for shard in manifest["shards"]:
        if not shard["clips"]:
            continue
        with storage.open(storage.join(uri, shard["name"])) as f:
            for row in pq.read_table(f).to_pylist():
                yield decode_row(row)


class CacheStream:
    """A latent cache as training reads it (vidgen.data.position): shard i is sample i of the epoch order, its
    rows (clips) are visited in an order seeded by (run.seed, epoch, i), and each rank reads its own shards."""

    def __init__(self, cfg: VidgenConfig, manifest: dict):
        self.source, self.manifest = cfg.data.latents, manifest
        shards = [s for s in manifest["shards"] if s["clips"]]
        if not shards:
            raise DataError(f"data.latents={self.source}: the cache holds no clips")
        self.files = [storage.join(self.source, s["name"]) for s in shards]
        self.num_samples, self.clips_per_sample = len(shards), max(s["clips"] for s in shards)
        self.seed, self.read_cpus = cfg.run.seed, cfg.data.read_cpus
        self.latents = registry.recipe_class(cfg.model, cfg.train.recipe).ENCODED[0]  # the video latents' column

    def share_dataset(self, epoch: int, samples, wanted):
        """One task per shard; rows as `decode_row` gives them, plus `bucket` (the latents' h x w, so that
        batches hold one size) and the position columns (vidgen.data.position.Shares)."""
        import ray.data  # lazy: importing latents does not load ray

        k = self.clips_per_sample
        items = [{"item": json.dumps({"uri": self.files[int(i)], "slot": int(i) * k, "order": j, "wanted": w.tolist(),
                                      "seed": [self.seed, epoch, int(i)], "latents": self.latents})}
                 for j, (i, w) in enumerate(zip(samples, wanted, strict=True))]
        ds = ray.data.from_items(items, override_num_blocks=min(4096, len(items)))
        ds = ds.flat_map(_share_rows, num_cpus=self.read_cpus, **data_task_args())
        ds.context.execution_options.preserve_order = True
        return ds


def _share_rows(item: dict) -> list[dict]:
    import pyarrow.parquet as pq  # lazy: importing latents does not load pyarrow

    d = json.loads(item["item"])
    with storage.open(d["uri"]) as f:
        rows = pq.read_table(f).to_pylist()
    out = []
    for k in np.random.default_rng(d["seed"]).permutation(len(rows)).tolist():
        if k < len(d["wanted"]) and d["wanted"][k]:
            row = decode_row(rows[k])
            bucket = "x".join(str(n) for n in row[d["latents"]].shape[-2:])
            out.append({**row, "bucket": bucket, "_slot": d["slot"] + k, "_order": d["order"], "_made": len(rows)})
    return out
