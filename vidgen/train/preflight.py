"""What `vidgen train` checks on the driver before any worker starts: every output location takes a file, and the
data is not provably worse than data.max_bad_fraction (vidgen.data.preflight). Each failure is one line."""

from __future__ import annotations

import uuid

from vidgen import storage
from vidgen.config import VidgenConfig
from vidgen.data.preflight import check_sample
from vidgen.errors import StorageError


def check_writable(field: str, uri: str) -> None:
    """StorageError naming `field` unless a file can be created (and removed) under `uri`, created if missing."""
    probe = storage.join(uri, f".vidgen-write-check-{uuid.uuid4().hex}")
    try:
        storage.makedirs(uri)
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except StorageError as e:
        raise StorageError(f"{field}={uri}: not writable, expected a folder this job can write ({e})") from None


def check_outputs_writable(cfg: VidgenConfig) -> None:
    """Checkpoints and the export (under the storage root), the data report and validation videos (run.workdir)."""
    from vidgen.train.launch import storage_root  # lazy: launch loads Ray and PyArrow

    check_writable("run.workdir", cfg.run.workdir)
    if cfg.train.storage_path:  # else <run.workdir>/train
        check_writable("train.storage_path", storage_root(cfg))


def check_data(cfg: VidgenConfig, stream) -> dict:
    """`check_sample` over a `ClipStream` of data.source, drawn with run.seed."""
    d = cfg.data
    return check_sample(stream.samples, d.source, d.max_bad_fraction, num_frames=cfg.model.num_frames, fps=d.fps,
                        source_fps=d.source_fps, seed=cfg.run.seed)
