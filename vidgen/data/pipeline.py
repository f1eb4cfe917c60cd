"""Clip streams: samples -> decoded, strided, resized clips, one row per clip, through Ray Data.

Shapes: F frames per clip, H/W pixels. Each row is
  frames uint8 [F, H, W, 3], prompt str, fps float (after striding), clip_id str ("<uri>#<start>"),
  source_uri str, start_frame int, stride int (source frames from one clip frame to the next),
  bucket str ("HxW": the clip's size, one of `buckets` when given).
With `buckets`, H and W vary between rows: batch them with `vidgen.data.buckets.bucket_batches`.

The driver only lists samples (a `SampleTable`, put once into Ray's object store); `ray.data.from_items` of
one small item per chunk of `samples_per_task` sample indices + `flat_map` does the reading, decoding, clip
sampling and resizing in CPU tasks (vidgen.data.worker), each process fetching the table once and making a
`Sample` at a time, streaming: a task's clips reach the consumer when it finishes, and memory holds a few
blocks of a few clips whatever the dataset's size. A bad sample
(corrupt frame, too short, missing prompt, ...) never fails the job: it yields no rows and leaves one
small JSON record under `report_dir`, which `ClipStream.report()` sums up and `check_bad_fraction`
turns into a DataError when too much was skipped. `iter_local()` runs the same code without Ray.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import tempfile
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from vidgen import storage
from vidgen.data.buckets import Bucket, parse_buckets
from vidgen.data.layouts import list_samples
from vidgen.data.listing import DEFAULT_PROMPT_TEMPLATE, Sample, SampleTable, as_table
from vidgen.data.worker import BadSample, ClipSpec, resolve_prompt, sample_clips
from vidgen.errors import ConfigError, DataError
from vidgen.ray_env import data_task_args

if TYPE_CHECKING:
    import ray.data

    from vidgen.config import VidgenConfig

__all__ = ["BadSample", "ClipSpec", "ClipStream", "check_bad_fraction", "read_clips", "read_clips_local",
           "resolve_prompt", "sample_clips"]

log = logging.getLogger(__name__)


def read_clips(
    source: str,
    layout: str = "auto",
    *,
    num_frames: int,
    height: int | None = None,
    width: int | None = None,
    buckets: str | list[Bucket] | None = None,
    fps: float | None = None,
    source_fps: float = 8.0,
    train: bool = True,
    seed: int = 0,
    epoch: int = 0,
    clips_per_video: int = 1,
    default_prompt: str = "",
    camera: int = 0,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    max_bad_fraction: float = 0.05,
    report_dir: str | None = None,
    num_cpus: float = 1.0,
    samples_per_task: int = 16,
) -> ClipStream:
    """List the samples under `source` (on the driver) and describe the clip stream over them.

    height, width: every clip's size; or buckets (a preset such as "hotshot-512" or "svd", or
    'WxH,...', see vidgen.data.buckets), and each clip gets the size nearest its aspect ratio
    (height/width are then ignored). camera, prompt_template: the opv2v layout's (LayoutOptions).
    epoch: training draws different (seeded) clips per epoch; use `stream.for_epoch(e)`.
    report_dir: where skipped samples are recorded; on a multi-node cluster give a shared URI
    (s3://...). Default: a fresh temporary directory on the driver's disk.
    num_cpus, samples_per_task: CPUs each Ray Data task reserves, samples it reads (data.read_cpus,
    data.samples_per_task, which say why these defaults).
    """
    bucket_list = parse_buckets(buckets)
    if bucket_list is None and (height is None or width is None):
        raise ConfigError("data.height and data.width: required unless data.buckets is set")
    height, width = (height, width) if bucket_list is None else bucket_list[0]
    for key, value in (("model.num_frames", num_frames), ("data.height", height), ("data.width", width),
                       ("data.clips_per_video", clips_per_video), ("data.samples_per_task", samples_per_task)):
        if value < 1:
            raise ConfigError(f"{key}: must be >= 1, got {value}")
    if fps is not None and not fps > 0:
        raise ConfigError(f"data.fps: must be > 0 or unset, got {fps}")
    if not source_fps > 0:
        raise ConfigError(f"data.source_fps: must be > 0, got {source_fps}")
    if not 0 <= max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction: must be within [0, 1], got {max_bad_fraction}")
    samples = list_samples(source, layout, camera=camera, prompt_template=prompt_template)
    spec = ClipSpec(num_frames=num_frames, height=height, width=width, fps=fps, source_fps=source_fps,
                    train=train, seed=seed, epoch=epoch, clips_per_video=clips_per_video,
                    default_prompt=default_prompt, buckets=tuple(bucket_list) if bucket_list else None)
    report_dir = report_dir or tempfile.mkdtemp(prefix="vidgen-skipped-")
    storage.makedirs(report_dir)  # fail here, on the driver, if it cannot be written
    return ClipStream(source, samples, spec, report_dir, max_bad_fraction, num_cpus, uuid.uuid4().hex,
                      samples_per_task)


def read_config_clips(cfg: VidgenConfig, *, train: bool, **kwargs: Any) -> ClipStream:
    """`read_clips` over `cfg.data` and `cfg.model.num_frames`: how training and the latent cache read clips.
    kwargs: read_clips' own options (report_dir, ...), or max_bad_fraction over data.max_bad_fraction."""
    d = cfg.data
    sized = {"buckets": d.buckets} if d.buckets else {"height": d.height, "width": d.width}
    opts = {"max_bad_fraction": d.max_bad_fraction, "num_cpus": d.read_cpus, "samples_per_task": d.samples_per_task,
            **kwargs}
    return read_clips(d.source, d.layout, num_frames=cfg.model.num_frames, **sized, fps=d.fps,
                      source_fps=d.source_fps, train=train, seed=cfg.run.seed, camera=d.camera,
                      prompt_template=d.prompt_template, clips_per_video=d.clips_per_video,
                      default_prompt=d.default_prompt, **opts)


def read_clips_local(source: str, layout: str = "auto", **kwargs: Any) -> Iterator[dict]:
    """The rows of `read_clips(source, layout, **kwargs)`, in sample order, without Ray."""
    yield from read_clips(source, layout, **kwargs).iter_local()


class ClipStream:
    """The clips of one dataset read: a lazily built Ray Dataset, or a local iterator, plus a report."""

    def __init__(self, source: str, samples: SampleTable | list[Sample], spec: ClipSpec, report_dir: str,
                 max_bad_fraction: float, num_cpus: float, token: str, samples_per_task: int):
        self.source, self.samples, self.spec = source, samples, spec
        self.report_dir, self.max_bad_fraction, self.num_cpus = report_dir, max_bad_fraction, num_cpus
        self.samples_per_task = samples_per_task
        self._token = token  # tags this read's skip records; older records in report_dir are ignored
        self._dataset = None
        self._shipped: dict = {}  # the table in Ray's object store: put once, shared with for_epoch's streams

    @property
    def samples(self) -> SampleTable:
        return self._samples

    @samples.setter
    def samples(self, samples: SampleTable | list[Sample]) -> None:
        self._samples = as_table(samples)
        self._dataset = None

    def __getstate__(self) -> dict:
        """Pickled (training puts the stream into Ray's object store for its workers) with the table's ObjectRef:
        every process that unpickles it ships the same table to its data tasks instead of putting its own."""
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            self._table_ref()
        return {**self.__dict__, "_dataset": None}

    def _table_ref(self):
        """The ObjectRef of `samples`, put once (again only when `samples` was replaced)."""
        import ray  # lazy: heavy; listing and local reads must not pay for Ray

        if self._shipped.get("table") is not self._samples:
            self._shipped.update(table=self._samples, ref=ray.put(self._samples))
        return self._shipped["ref"]

    def _chunks(self, n: int):
        """Ray Dataset of one item {lo, hi} per `samples_per_task` consecutive positions of n."""
        import ray.data  # lazy: heavy; listing and local reads must not pay for Ray

        items = [{"lo": lo, "hi": min(n, lo + self.samples_per_task)} for lo in range(0, n, self.samples_per_task)]
        return ray.data.from_items(items, override_num_blocks=max(1, min(4096, len(items))))

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def clips_per_sample(self) -> int:
        return self.spec.clips_per_video

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def dataset(self):
        """`ray.data.Dataset`, one row per clip, streamed: each task reads `samples_per_task` samples."""
        if self._dataset is None:
            import ray.data  # lazy: heavy; listing and local reads must not pay for Ray

            if ray.is_initialized() and not storage.is_remote(self.report_dir) and len(ray.nodes()) > 1:
                log.warning("report_dir %s is on the driver's local disk but Ray has %d nodes: skips on "
                            "other nodes will be missing from report(); pass a shared URI (s3://...)",
                            self.report_dir, len(ray.nodes()))
            ds = self._chunks(len(self.samples))  # first: it starts Ray when nothing has yet
            fn = partial(_rows_for_chunk, refs=[self._table_ref()], spec=self.spec, report_dir=self.report_dir,
                         token=self._token)
            self._dataset = ds.flat_map(fn, num_cpus=self.num_cpus, **data_task_args())
        return self._dataset

    def for_epoch(self, epoch: int) -> ClipStream:
        """The same samples and report, with the clips (and crops) of another training epoch."""
        spec = dataclasses.replace(self.spec, epoch=epoch)
        stream = ClipStream(self.source, self.samples, spec, self.report_dir, self.max_bad_fraction,
                            self.num_cpus, self._token, self.samples_per_task)
        stream._shipped = self._shipped
        return stream

    def share_dataset(self, epoch: int, samples, wanted) -> ray.data.Dataset:
        """One rank's share of `epoch`: `samples` (indices into self.samples, in the order the rank consumes them)
        and `wanted` (bool [n, K]: which of each one's clips are still to train, vidgen.data.position). Rows are
        clip rows plus `_slot` (sample index x K + clip), `_order` (the position in `samples`) and `_made` (how
        many clips the sample makes); the order of `samples` is kept. One item per `samples_per_task` of them:
        the table and the share's arrays travel through Ray's object store, not in the items."""
        import ray  # lazy: heavy; listing and local reads must not pay for Ray

        samples, wanted = np.asarray(samples, dtype=np.int64), np.asarray(wanted, dtype=bool)
        if wanted.shape != (len(samples), self.spec.clips_per_video):
            raise ValueError(f"wanted: expected shape {(len(samples), self.spec.clips_per_video)}, got {wanted.shape}")
        ds = self._chunks(len(samples))
        fn = partial(_share_rows, refs=[self._table_ref(), ray.put((samples, wanted))],
                     spec=dataclasses.replace(self.spec, epoch=epoch), report_dir=self.report_dir, token=self._token)
        ds = ds.flat_map(fn, num_cpus=self.num_cpus, **data_task_args())
        ds.context.execution_options.preserve_order = True
        return ds

    def iter_local(self) -> Iterator[dict]:
        """The same rows as `dataset`, in sample order, computed in this process."""
        for sample in self.samples:
            yield from _rows_or_record(sample, self.spec, self.report_dir, self._token)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_local()

    def report(self) -> dict:
        """{total, skipped, reasons: {reason: count}, bad: [{uri, reason, detail}], report_dir}.

        Complete once the dataset (or iter_local) has been consumed.
        """
        bad = []
        if storage.exists(self.report_dir):
            for uri in storage.walk_files(self.report_dir, suffixes=(".json",)):
                record = json.loads(storage.read_text(uri))
                if record.get("token") == self._token:
                    bad.append({k: record[k] for k in ("uri", "reason", "detail")})
        if bad:  # only this stream's samples (feed.py cuts a stream short)
            uris = {self._samples.uri(i) for i in range(len(self._samples))}
            bad = [b for b in bad if b["uri"] in uris]
        bad.sort(key=lambda r: r["uri"])
        reasons = Counter(r["reason"] for r in bad)
        return {"total": self.num_samples, "skipped": len(bad), "reasons": dict(reasons.most_common()),
                "bad": bad, "report_dir": self.report_dir}

    def check(self) -> dict:
        """report(), raising DataError when more than max_bad_fraction of the samples was skipped."""
        report = self.report()
        check_bad_fraction(report, self.max_bad_fraction)
        return report


def check_bad_fraction(report: dict, limit: float) -> None:
    """DataError naming the commonest skip reasons and an example when skipped/total > limit."""
    total, skipped = report["total"], report["skipped"]
    if total == 0 or skipped / total <= limit:
        return
    common = ", ".join(f"{reason} ({n})" for reason, n in Counter(report["reasons"]).most_common(3))
    example = report["bad"][0] if report["bad"] else None
    example_text = f"; e.g. {example['uri']}: {example.get('detail', example['reason'])}" if example else ""
    where = f"; one record per sample under {report['report_dir']}" if report.get("report_dir") else ""
    raise DataError(f"{skipped} of {total} samples skipped ({skipped / total:.1%}), more than "
                    f"data.max_bad_fraction={limit}: {common}{example_text}{where}")


# ---- per-sample work (runs in Ray tasks or locally) ------------------------------------------------


_SHIPPED: OrderedDict = OrderedDict()  # per worker process: ObjectRef hex -> its value, the last few


def _shipped(ref):
    """The value of `ref`, fetched once per process (a table is fetched once, not once per task)."""
    key = ref.hex()
    if key in _SHIPPED:
        _SHIPPED.move_to_end(key)
    else:
        import ray  # lazy: heavy; the module loads without Ray (here, in a Ray task, it is loaded)

        _SHIPPED[key] = ray.get(ref)
        while len(_SHIPPED) > 4:
            _SHIPPED.popitem(last=False)
    return _SHIPPED[key]


def _rows_for_chunk(item: dict, refs: list, spec: ClipSpec, report_dir: str, token: str) -> list[dict]:
    table = _shipped(refs[0])
    return [row for i in range(item["lo"], item["hi"]) for row in _rows_or_record(table[i], spec, report_dir, token)]


def _share_rows(item: dict, refs: list, spec: ClipSpec, report_dir: str, token: str) -> list[dict]:
    table, (samples, wanted) = _shipped(refs[0]), _shipped(refs[1])
    k, out = spec.clips_per_video, []
    for j in range(item["lo"], item["hi"]):
        i, want = int(samples[j]), wanted[j]
        rows = _rows_or_record(table[i], spec, report_dir, token)[:k]
        out += [{**row, "_slot": i * k + c, "_order": j, "_made": len(rows)} for c, row in enumerate(rows) if want[c]]
    return out


def _rows_or_record(sample: Sample, spec: ClipSpec, report_dir: str, token: str) -> list[dict]:
    """The sample's clip rows; on any failure, [] and a skip record (never an exception)."""
    try:
        return sample_clips(sample, spec)
    except BadSample as e:
        reason, detail = e.reason, e.detail
    except Exception as e:  # a bug or an unforeseen input: skipped and reported, still not fatal
        log.warning("unexpected error on %s", sample.uri, exc_info=True)
        reason, detail = f"unexpected {type(e).__name__}", f"{sample.uri}: {e}"[:500]
    record = {"uri": sample.uri, "reason": reason, "detail": detail, "token": token}
    name = hashlib.blake2b(sample.uri.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest() + ".json"
    storage.write_json(storage.join(report_dir, name), record)
    return []
