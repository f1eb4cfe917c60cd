"""Before a job spends its accelerators: is more of the data bad than `data.max_bad_fraction` allows?

A seeded random sample of the listing (256 samples by default) has its headers read as `vidgen data inspect`
reads them (in parallel, no frame decoded), in seconds whatever the dataset's size. The job is refused when the
sample proves the limit exceeded:
- certainly: the bad samples found are already more than max_bad_fraction x all samples (a small dataset is read
  whole, so its exact fraction decides), or
- beyond reasonable doubt: the one-sided Wilson score lower bound of the bad fraction, at z = 3.29 (99.95%),
  is above the limit. Wilson's bound, unlike the normal approximation, stays valid at the few bad samples in
  256 that matter here; drawing without replacement only narrows the true interval, so the bound is
  conservative. A dataset at exactly the limit is refused by chance once in 2,000 runs at most.
What headers cannot show (a frame truncated after its header) is left to the stream: training counts the skips
as it reads and stops as soon as they pass the limit (vidgen.train.loop), and the data report decides at the end.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from vidgen.data.clips import clip_span, frame_stride
from vidgen.data.inspect import header_infos, shard_infos
from vidgen.data.listing import SampleTable
from vidgen.errors import DataError

SAMPLE_SIZE = 256
Z = 3.29  # one-sided 99.95%


def wilson_lower(bad: int, n: int, z: float = Z) -> float:
    """The Wilson score interval's lower end for `bad` successes in `n` draws."""
    if n == 0:
        return 0.0
    p = bad / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def check_sample(samples: SampleTable, source: str, limit: float, *, num_frames: int, fps: float | None,
                 source_fps: float, seed: int, size: int = SAMPLE_SIZE, workers: int = 8) -> dict:
    """Read the headers of `size` samples drawn with `seed`; DataError when they prove more than `limit` of all
    the samples bad (see the module docstring). A sample is bad when its header cannot be read, its prompt is
    missing, or it has too few frames for one clip of `num_frames` at `fps`. Returns {sampled, bad, bound}."""
    total = len(samples)
    n = min(size, total)
    picked = np.sort(np.random.default_rng([seed % (1 << 64), 0x7E57]).choice(total, n, replace=False))
    subset = samples.take(picked)
    shards = subset[0].meta.get("layout") == "shards"
    infos = shard_infos(subset) if shards else header_infos(subset, source_fps, False, workers)
    bad = []
    for i, info in enumerate(infos):
        if info.get("bad") is None:
            span = clip_span(num_frames, frame_stride(info["fps"], fps))
            if info["frames"] >= span:
                continue
            info["bad"] = ("too few frames", f"{subset.uri(i)}: {info['frames']} frames, a clip needs {span}")
        bad.append(info["bad"])
    k = len(bad)
    bound = k / n if n == total else wilson_lower(k, n)
    if k > limit * total or bound > limit:
        if n == total:
            verdict = f"{k} of the {total} samples are bad ({k / n:.1%}), more than"
        elif k > limit * total:
            verdict = f"{k} of {n} samples read before training are bad, already more than all {total} allow at"
        else:
            verdict = (f"{k} of {n} samples read before training are bad ({k / n:.1%}), so at least {bound:.1%} "
                       f"of all {total} are (99.95% confidence), more than")
        reasons = ", ".join(f"{r} ({c})" for r, c in Counter(r for r, _ in bad).most_common(3))
        examples = "; ".join(f"{r}: {d}" for r, d in bad[:2]).replace("\n", " ")
        raise DataError(f"data.source={source}: {verdict} data.max_bad_fraction={limit}: {reasons}; e.g. {examples}")
    return {"sampled": n, "bad": k, "bound": bound}
