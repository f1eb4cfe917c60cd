"""Data: discover samples in a storage layout, decode frames/videos, sample and resize clips, stream rows.

    listing   Sample, Listing (one grouped walk of a root), LayoutOptions, SampleTable (samples as columns)
    layouts   root -> SampleTable   (hotshot | frames | videos | opv2v | sthv2 | shards; detect_layout picks one)
    opv2v     the OpenCOOD camera tree as a layout (listing, prompts, timestamps)
    opv2v_prepare  prepare_opv2v: OPV2V camera sequences -> hotshot scene folders (vidgen prepare opv2v)
    seer      Something-Something v2 / Bridge / Epic-Kitchens frame trees (the sthv2 layout)
    shards    the packed parquet clip format; pack writes it (vidgen prepare pack)
    decode    image bytes -> uint8 [H, W, 3] RGB; natural frame order
    video     mp4 write (atomic), seeking clip reads, probing (PyAV)
    clips     pure clip sampling and resize/crop
    buckets   aspect-ratio buckets and bucket-homogeneous batches
    worker    one sample -> its clip rows (read, decode, sample, resize); BadSample for bad input
    pipeline  read_clips -> ClipStream (Ray Data over chunks of the table, one row per clip) + skip report
    inspect   counts, histograms and bad samples from listings and headers (vidgen data inspect)
    synth     a tiny moving-shapes dataset for tests and the demo
Ray is imported only when a Ray Dataset is built; torch only when a clip is resized.
"""

from vidgen.data.buckets import bucket_batches, nearest_bucket, parse_buckets
from vidgen.data.clips import clip_starts, frame_stride, resize_cover_crop, sample_rng
from vidgen.data.decode import decode_image, natural_key
from vidgen.data.inspect import format_report, inspect_source
from vidgen.data.layouts import LAYOUTS, detect_layout, list_samples
from vidgen.data.listing import LayoutOptions, Sample, SampleTable
from vidgen.data.opv2v_prepare import prepare_opv2v
from vidgen.data.pack import pack
from vidgen.data.pipeline import ClipSpec, ClipStream, check_bad_fraction, read_clips, read_clips_local
from vidgen.data.synth import make_moving_shapes
from vidgen.data.video import probe_video, read_video, write_video

__all__ = [
    "LAYOUTS",
    "ClipSpec",
    "ClipStream",
    "LayoutOptions",
    "Sample",
    "SampleTable",
    "bucket_batches",
    "check_bad_fraction",
    "clip_starts",
    "decode_image",
    "detect_layout",
    "format_report",
    "frame_stride",
    "inspect_source",
    "list_samples",
    "make_moving_shapes",
    "natural_key",
    "nearest_bucket",
    "pack",
    "parse_buckets",
    "prepare_opv2v",
    "probe_video",
    "read_clips",
    "read_clips_local",
    "read_video",
    "resize_cover_crop",
    "sample_rng",
    "write_video",
]
