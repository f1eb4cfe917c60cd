"""Listing benchmark: a million-sample frame-folder tree listed, inspected and turned into training's first Dataset.

    python benchmarks/listing.py                      # 1,000,000 samples (building the tree takes minutes)
    python benchmarks/listing.py --samples 100000 --old 100000 --dir /big/disk --keep

Tree (not timed): the Hotshot layout, root/sample_NNNNNNN/{0..7}.jpg + prompt.txt, every frame a hard link of one
small real JPEG and every prompt.txt of one text file (ext4 allows 65,000 links to a file, so a pool of copies is
linked round-robin). A million folders cost ~4 GB of directory blocks and a million inodes; the tree is removed
afterwards unless --keep (a kept tree is reused by the next run with the same --dir and --samples).

Figures, each in a fresh process (peak RSS from getrusage of that process; `listing_mb` is the peak less the
process's RSS before the listing, i.e. what the listing itself holds):
  list_samples   vidgen.data.list_samples(root): wall and memory (the issue's goals: < 120 s, < 1 GiB).
  inspect        `vidgen data inspect ROOT --first-header-only`: wall and peak RSS of the CLI process (it reads
                 one JPEG header and one prompt file per sample, so it takes longer than the listing).
  train_start    what training start does on the driver: read_clips (listing + ClipStream), Ray started, then
                 the first epoch's share for rank 0 of 1 (DataPosition.share) and `ClipStream.share_dataset`, the
                 Ray Dataset object built (not consumed); then, untimed for memory, the first row pulled through
                 it (the table shipped to a worker and a clip decoded).
With --old N, list_samples, inspect and the Ray Dataset build (`ClipStream.dataset`) of the committed code
(`git archive HEAD`) run on an N-sample tree for comparison. One JSON line per figure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRAMES = 8
LINKS_PER_FILE = 60_000  # under ext4's 65,000 hard links per inode


def build_tree(root: Path, samples: int) -> float:
    """The Hotshot tree of `samples` folders under root (reused when its marker says it is complete); seconds."""
    from PIL import Image

    marker = root / ".complete"
    if marker.exists() and marker.read_text() == str(samples):
        return 0.0
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    pool = root.parent / f".{root.name}-sources"
    shutil.rmtree(pool, ignore_errors=True)
    pool.mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buf, format="JPEG", quality=90)
    frames = -(-samples * FRAMES // LINKS_PER_FILE)
    prompts = -(-samples // LINKS_PER_FILE)
    for i in range(frames):
        (pool / f"f{i}.jpg").write_bytes(buf.getvalue())
    for i in range(prompts):
        (pool / f"p{i}.txt").write_text("a car drives through a synthetic city\n")
    root.mkdir(parents=True)
    link, n = os.link, 0
    for s in range(samples):
        folder = f"{root}/sample_{s:07d}"
        os.mkdir(folder)
        for f in range(FRAMES):
            link(f"{pool}/f{n // LINKS_PER_FILE}.jpg", f"{folder}/{f}.jpg")
            n += 1
        link(f"{pool}/p{s // LINKS_PER_FILE}.txt", f"{folder}/prompt.txt")
    shutil.rmtree(pool)
    marker.write_text(str(samples))  # a hidden name: no layout lists it as a sample
    return time.perf_counter() - t0


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(what: str, root: str, old: bool) -> dict:
    """One figure, in this (fresh) process."""
    import numpy as np

    from vidgen.data.layouts import list_samples
    from vidgen.data.pipeline import read_clips

    before = _rss_mb()
    if what == "list_samples":
        t0 = time.perf_counter()
        samples = list_samples(root)
        wall = time.perf_counter() - t0
        peak = _peak_mb()
        first = samples[0]
        return {"samples": len(samples), "wall_s": round(wall, 1), "peak_rss_mb": round(peak),
                "listing_mb": round(peak - before), "held_mb": round(_rss_mb() - before),
                "first": [first.uri, len(first.frame_uris), first.prompt_uri]}
    if what == "train_start":
        import ray

        t0 = time.perf_counter()
        stream = read_clips(root, num_frames=FRAMES, height=32, width=32, report_dir=tempfile.mkdtemp())
        listed = time.perf_counter() - t0
        t1 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        if old:
            ds = stream.dataset
        else:
            from vidgen.data.position import DataPosition

            position = DataPosition(stream.num_samples, stream.clips_per_sample)
            ds = stream.share_dataset(0, *position.share(0, 0, 1, stream.seed))
        built = time.perf_counter() - t2
        peak = _peak_mb()
        t3 = time.perf_counter()
        row = next(iter(ds.iter_rows()))
        first_row = time.perf_counter() - t3
        out = {"samples": stream.num_samples, "read_clips_s": round(listed, 1), "ray_init_s": round(ray_s, 1),
               "dataset_build_s": round(built, 1), "read_clips_plus_build_s": round(listed + built, 1),
               "peak_rss_mb": round(peak), "driver_mb": round(peak - before),
               "first_row_s": round(first_row, 1), "first_row_shape": list(np.asarray(row["frames"]).shape)}
        ray.shutdown()
        return out
    raise SystemExit(f"unknown figure {what}")


def measure(what: str, root: Path, old_tree: str | None) -> dict:
    """Run one figure in a fresh process (under the committed code when old_tree is given)."""
    env = {**os.environ, "PYTHONPATH": old_tree or str(REPO), "RAY_DATA_USE_DATASOURCE_V2": "0"}
    if what == "inspect":
        cmd = [sys.executable, "-c", "import sys; from vidgen.cli import main; sys.exit(main())",
               "data", "inspect", str(root), "--first-header-only"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                cwd=old_tree or REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out, err = proc.stdout.read(), proc.stderr.read()  # small: inspect prints a short report
        if status:
            raise SystemExit(f"inspect failed ({status}):\n{err[-3000:]}")
        return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
                "report_head": out.splitlines()[:2]}
    cmd = [sys.executable, __file__, "--_run", what, "--_root", str(root)] + (["--_old"] if old_tree else [])
    # cwd: Ray puts the driver's working directory first on its workers' path
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=old_tree or REPO)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def committed_code(dest: Path) -> str:
    """The vidgen package as committed (HEAD), unpacked under dest; its path for PYTHONPATH."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "vidgen"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return str(dest)


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1_000_000, help="Hotshot sample folders in the tree (default 1M)")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "vidgen-bench-listing"),
                    help="where the tree is built (hard links; ~4 GB of directory blocks at 1M)")
    ap.add_argument("--keep", action="store_true", help="leave the tree(s) for the next run")
    ap.add_argument("--old", type=int, default=0, help="also measure the committed code on a tree of this many")
    ap.add_argument("--figures", default="list_samples,inspect,train_start",
                    help="which to measure, each in a fresh process: list_samples, inspect "
                    "(vidgen data inspect --first-header-only), train_start (listing + the first epoch's Dataset)")
    ap.add_argument("--_run", help=argparse.SUPPRESS)
    ap.add_argument("--_root", help=argparse.SUPPRESS)
    ap.add_argument("--_old", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._run:
        print(json.dumps(run_child(args._run, args._root, args._old)))
        return

    work = Path(args.dir)
    runs = [("new", args.samples, None)]
    if args.old:
        runs.append(("old", args.old, committed_code(work / "committed")))
    try:
        for code, samples, old_tree in runs:
            root = work / f"hotshot-{samples}"
            emit(figure="tree", samples=samples, files=samples * (FRAMES + 1), build_s=round(build_tree(root, samples)),
                 root=str(root))
            for what in args.figures.split(","):
                emit(figure=what, code=code, **measure(what, root, old_tree))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
