"""Data: discover samples in a storage layout, decode frames/videos, sample and resize clips, stream rows.

    layouts   root -> [Sample]   (hotshot | frames | videos; detect_layout picks one)
    decode    image bytes -> uint8 [H, W, 3] RGB; natural frame order
    video     mp4 write (atomic), seeking clip reads, probing (PyAV)
    clips     pure clip sampling and resize/crop
    pipeline  read_clips -> ClipStream (Ray Data, one row per clip) + skip report
    synth     a tiny moving-shapes dataset for tests and the demo
Ray is imported only when a Ray Dataset is built.
"""

from vidgen.data.clips import clip_starts, frame_stride, resize_cover_crop, sample_rng
from vidgen.data.decode import decode_image, natural_key
from vidgen.data.layouts import LAYOUTS, Sample, detect_layout, list_samples
from vidgen.data.pipeline import ClipSpec, ClipStream, check_bad_fraction, read_clips, read_clips_local
from vidgen.data.synth import make_moving_shapes
from vidgen.data.video import probe_video, read_video, write_video

__all__ = [
    "LAYOUTS",
    "ClipSpec",
    "ClipStream",
    "Sample",
    "check_bad_fraction",
    "clip_starts",
    "decode_image",
    "detect_layout",
    "frame_stride",
    "list_samples",
    "make_moving_shapes",
    "natural_key",
    "probe_video",
    "read_clips",
    "read_clips_local",
    "read_video",
    "resize_cover_crop",
    "sample_rng",
    "write_video",
]
