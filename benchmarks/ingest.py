"""Ingest benchmark: vidgen's clip reading against what a user would otherwise run, side by side.

    python benchmarks/ingest.py            # full: 96 folders x 14 frames (1x), 960 (10x), 2 repeats
    python benchmarks/ingest.py --quick    # 60 folders (1x), 600 (10x), 1 repeat

Corpus: synthetic frame folders of 1280x720 JPEG frames (quality 90; smooth scenery, moving shapes
and sensor noise, ~100-150 KB a frame, like real 720p video frames), read as 14-frame clips at
512x320 (WxH). The 10x corpus hard-links the 1x files into ten times as many folders: the same
bytes on disk, ten times the samples to stream.

Loaders, each in its own process pinned (sched_setaffinity) to 1 or 2 cores:
  pil_loader     the reference projects' loader: a torch Dataset whose __getitem__ opens each frame
                 with PIL, converts to RGB, resizes (bicubic) to cover 512x320 and centre-crops, in a
                 DataLoader with one worker per core.
  decode_floor   decoding the same frames at full size and nothing else (PIL `Image.load`), one
                 process per core: what any loader that fully decodes must pay.
  vidgen_ray     vidgen.data.read_clips(...).dataset iterated on the driver: Ray Data tasks
                 (data.read_cpus each) in a local Ray with num_cpus = cores.
  vidgen_local   the same per-sample code without Ray (one process per core): vidgen's decode path
                 (JPEG draft decode at 1/2 scale, uint8 antialiased resize of the whole clip).
What a training epoch gets: each loader makes one untimed pass over the corpus (its workers start, import and warm
the page cache), then the clock runs over a whole second pass, from its start to its last clip, with every clip's
frames materialised. vidgen_ray runs with the config's defaults (data.read_cpus, data.samples_per_task) unless
--task-cpus / --samples-per-task say otherwise.
Peak memory is sampled every 0.25 s (PSS every 1 s) over the loader's whole process tree (driver,
Ray's raylet and GCS, workers): RSS summed (shared pages counted once per process) and PSS (shared
pages split). CPU seconds are summed over the same tree, less the sampler's own.

Output: one JSON line per figure (frames_per_s_per_core and frames_per_cpu_s per loader and core
count, the ratios the ingest issue sets goals for on both bases, 2-core scaling, peak memory at 1x
and 10x), then a summary line. On a machine shared with other work the wall-clock figures move by
tens of percent from run to run; the CPU-time figures are the steadier measure of work per frame.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, NUM_FRAMES = 512, 320, 14
SRC_W, SRC_H = 1280, 720
LOADERS = ("pil_loader", "decode_floor", "vidgen_local", "vidgen_ray")


# ---- corpus ----------------------------------------------------------------------------------------


def make_corpus(root: Path, folders: int, seed: int = 0) -> Path:
    """`folders` folders of NUM_FRAMES 1280x720 JPEG frames (reused when already complete)."""
    from PIL import Image

    marker = root / f".complete-{folders}"
    if marker.exists():
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SRC_H, :SRC_W].astype(np.float32)
    for v in range(folders):
        folder = root / f"video_{v:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        # Scenery: a colour gradient plus smooth blobs (low-resolution noise upsampled), as in real footage.
        low = rng.normal(0, 40, (SRC_H // 80 + 1, SRC_W // 80 + 1, 3)).astype(np.float32)
        blobs = np.asarray(Image.fromarray(np.clip(low + 128, 0, 255).astype(np.uint8)).resize(
            (SRC_W, SRC_H), Image.Resampling.BICUBIC), np.float32) - 128
        base = np.stack([xx / SRC_W * 200, yy / SRC_H * 160 + 40, (xx + yy) / (SRC_W + SRC_H) * 120 + 60], -1)
        cy, cx = rng.uniform(100, 600), rng.uniform(100, 1100)
        vy, vx = rng.uniform(-8, 8), rng.uniform(-15, 15)
        for t in range(NUM_FRAMES):
            frame = base + blobs
            mask = (yy - cy - vy * t) ** 2 + (xx - cx - vx * t) ** 2 < 60 ** 2
            frame[mask] = (230, 60, 40)
            frame += rng.normal(0, 3, frame.shape).astype(np.float32)  # sensor noise
            Image.fromarray(np.clip(frame, 0, 255).astype(np.uint8)).save(folder / f"{t}.jpg", quality=90)
    marker.touch()
    return root


def linked_copy(src: Path, dst: Path, times: int) -> Path:
    """`times` hard-linked copies of every folder of `src` under `dst` (same bytes, more samples)."""
    marker = dst / f".complete-{times}"
    if marker.exists():
        return dst
    for k in range(times):
        for folder in sorted(p for p in src.iterdir() if p.is_dir()):
            target = dst / f"{k:02d}_{folder.name}"
            target.mkdir(parents=True, exist_ok=True)
            for f in folder.iterdir():
                if not (target / f.name).exists():
                    os.link(f, target / f.name)
    marker.touch()
    return dst


def _folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


# ---- memory and CPU sampling ----------------------------------------------------------------------


class TreeMonitor:
    """Peak RSS and PSS (MiB) of this process and all its descendants, and the CPU seconds they use,
    sampled in a thread. CPU time is what makes per-core figures meaningful on a shared machine:
    wall time there depends on what else runs, CPU seconds per frame much less. The sampler's own
    CPU time (reading /proc for a dozen Ray processes is not free) is measured and left out, and
    PSS (the costly part: it walks page tables) is read once a second."""

    def __init__(self, interval: float = 0.25, pss_every: int = 4):
        import psutil

        self._psutil, self._interval, self._pss_every = psutil, interval, pss_every
        self.peak_rss = self.peak_pss = 0.0
        self._cpu: dict[int, float] = {}  # pid -> last seen user + system seconds
        self._mark: dict[int, float] = {}
        self._own = self._own_at_mark = 0.0  # CPU seconds spent sampling
        self._samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMonitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> None:
        """Start counting CPU seconds from now."""
        self.sample()
        with self._lock:
            self._mark, self._own_at_mark = dict(self._cpu), self._own

    def cpu_since_mark(self) -> float:
        self.sample()
        with self._lock:  # processes that exited count with their last sample (at most one interval early)
            used = sum(t - self._mark.get(pid, 0.0) for pid, t in self._cpu.items())
            return used - (self._own - self._own_at_mark)

    def sample(self) -> None:
        start = time.thread_time()
        with_pss = self._samples % self._pss_every == 0
        self._samples += 1
        me = self._psutil.Process()
        rss = pss = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                with p.oneshot():
                    times = p.cpu_times()
                    if with_pss:
                        info = p.memory_full_info()
                        rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
                    else:
                        rss += p.memory_info().rss
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied):
                continue
            with self._lock:
                self._cpu[p.pid] = times.user + times.system
        self.peak_rss = max(self.peak_rss, rss / 2**20)
        if with_pss:
            self.peak_pss = max(self.peak_pss, pss / 2**20)
        with self._lock:
            self._own += time.thread_time() - start

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)


# ---- the loaders (each runs in a child process) ----------------------------------------------------


def _pil_clip(folder: str) -> np.ndarray:
    """The reference loader's per-clip work: open, convert, resize to cover, centre-crop, per frame."""
    from PIL import Image

    frames = []
    for t in range(NUM_FRAMES):
        img = Image.open(os.path.join(folder, f"{t}.jpg")).convert("RGB")
        scale = max(WIDTH / img.width, HEIGHT / img.height)
        w, h = round(img.width * scale), round(img.height * scale)
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - WIDTH) // 2, (h - HEIGHT) // 2
        frames.append(np.asarray(img.crop((left, top, left + WIDTH, top + HEIGHT))))
    return np.stack(frames)


def _decode_clip(folder: str) -> int:
    from PIL import Image

    for t in range(NUM_FRAMES):
        with Image.open(os.path.join(folder, f"{t}.jpg")) as img:
            img.load()
    return NUM_FRAMES


def _vidgen_clip(sample) -> int:
    from vidgen.data.pipeline import sample_clips

    return sum(len(r["frames"]) for r in sample_clips(sample, _SPEC))


_SPEC = None


def _init_vidgen(spec) -> None:
    global _SPEC
    _SPEC = spec
    import torch

    torch.set_num_threads(1)  # one process per core


def _warm(row=None):
    """Imports a data worker needs (torch for the resize), done before the clock starts."""
    import torch

    import vidgen.data.pipeline  # noqa: F401

    torch.set_num_threads(1)
    return row if row is not None else 0


def _timed(make_pass, monitor: TreeMonitor) -> tuple[int, float, float]:
    """(frames, seconds, CPU seconds) of one whole pass over the corpus, as a user's training epoch gets it:
    `make_pass()` returns a fresh iterator of frame counts per unit of output (a clip; a block of clips for Ray
    Data), and every unit's frames are materialised by the loader. A first pass warms the loader up (its worker
    processes and their imports, the page cache, Ray Data's per-cluster actors), untimed; the clock then runs from
    the start of the second pass, its own start-up included, to its last unit."""
    sum(make_pass())
    monitor.mark()
    start = time.perf_counter()
    frames = sum(make_pass())
    seconds = time.perf_counter() - start
    return frames, seconds, monitor.cpu_since_mark()


def run_loader(loader: str, corpus: Path, cores: int, task_cpus: float | None = None,
               samples_per_task: int | None = None) -> dict:
    folders = [str(p) for p in _folders(corpus)]
    settings: dict = {}
    with TreeMonitor() as mon:
        if loader == "pil_loader":
            import torch
            from torch.utils.data import DataLoader, Dataset

            class Clips(Dataset):
                def __len__(self):
                    return len(folders)

                def __getitem__(self, i):
                    return torch.from_numpy(_pil_clip(folders[i]))

            torch.set_num_threads(1)
            loader_it = DataLoader(Clips(), batch_size=1, num_workers=cores, prefetch_factor=2,
                                   persistent_workers=True)
            # DataLoader workers fork from this process, which has every import already.
            frames, seconds, cpu = _timed(lambda: (b.shape[1] for b in loader_it), mon)
        elif loader == "decode_floor":
            import multiprocessing as mp

            with mp.get_context("fork").Pool(cores) as pool:
                pool.map(_warm, range(cores))
                frames, seconds, cpu = _timed(lambda: pool.imap(_decode_clip, folders), mon)
        elif loader == "vidgen_local":
            import multiprocessing as mp

            from vidgen.data import read_clips

            stream = read_clips(str(corpus), "frames", num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH,
                                train=False)
            ctx = mp.get_context("fork")
            with ctx.Pool(cores, initializer=_init_vidgen, initargs=(stream.spec,)) as pool:
                pool.map(_warm, range(cores))
                frames, seconds, cpu = _timed(lambda: pool.imap(_vidgen_clip, stream.samples), mon)
        elif loader == "vidgen_ray":
            import ray

            from vidgen.config import DataConfig
            from vidgen.data import read_clips

            defaults = DataConfig()  # what training gets unless the user sets data.read_cpus/samples_per_task
            settings = {"read_cpus": task_cpus or defaults.read_cpus,
                        "samples_per_task": samples_per_task or defaults.samples_per_task}
            ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
                     _temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"))
            ray.data.DataContext.get_current().enable_progress_bars = False
            stream = read_clips(str(corpus), "frames", num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH,
                                train=False, num_cpus=settings["read_cpus"],
                                samples_per_task=settings["samples_per_task"])
            frames, seconds, cpu = _timed(lambda: (len(b["frames"]) * NUM_FRAMES for b in
                                                   stream.dataset.iter_batches(batch_size=None,
                                                                               batch_format="numpy")), mon)
            ray.shutdown()
        else:
            raise SystemExit(f"unknown loader {loader}")
    return {"loader": loader, "cores": cores, "clips": len(folders), "frames": frames, "seconds": seconds,
            "fps": frames / seconds, "cpu_s": cpu, "frames_per_cpu_s": frames / cpu,
            "peak_rss_mb": round(mon.peak_rss, 1), "peak_pss_mb": round(mon.peak_pss, 1), **settings}


# ---- driver ----------------------------------------------------------------------------------------


def measure(loader: str, corpus: Path, cores: int, task_cpus: float | None = None,
            samples_per_task: int | None = None) -> dict:
    """Run one loader in a fresh process pinned to `cores` CPUs; its JSON result."""
    cmd = [sys.executable, __file__, "--_run", loader, "--_corpus", str(corpus), "--_cores", str(cores)]
    cmd += ["--task-cpus", str(task_cpus)] if task_cpus else []
    cmd += ["--samples-per-task", str(samples_per_task)] if samples_per_task else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise SystemExit(f"{loader} on {cores} cores failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def emit(**figure) -> None:
    print(json.dumps(figure), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small corpus, one repeat")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "vidgen-bench-ingest"))
    ap.add_argument("--folders", type=int, help="folders in the 1x corpus (default 96, quick 60)")
    ap.add_argument("--repeats", type=int, help="runs per figure, best kept (default 2, quick 1)")
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--task-cpus", type=float, default=None,
                    help="data.read_cpus for vidgen_ray (default: the config's default)")
    ap.add_argument("--samples-per-task", type=int, default=None,
                    help="data.samples_per_task for vidgen_ray (default: the config's default)")
    ap.add_argument("--_run"), ap.add_argument("--_corpus"), ap.add_argument("--_cores", type=int)
    args = ap.parse_args()
    if args._run:  # child: pin, run, print one JSON line
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args._cores])
        print(json.dumps(run_loader(args._run, Path(args._corpus), args._cores, args.task_cpus,
                                    args.samples_per_task)))
        return

    folders = args.folders or (60 if args.quick else 96)
    repeats = args.repeats or (1 if args.quick else 2)
    loaders = args.loaders.split(",")
    cores_list = [c for c in (1, 2) if c <= len(os.sched_getaffinity(0))]
    work = Path(args.workdir)
    t0 = time.perf_counter()
    one = make_corpus(work / f"corpus-{folders}", folders)
    ten = linked_copy(one, work / f"corpus-{folders}-x10", 10)
    emit(figure="corpus", folders_1x=folders, folders_10x=10 * folders, frames_per_clip=NUM_FRAMES,
         source=f"{SRC_W}x{SRC_H} jpeg q90", target=f"{WIDTH}x{HEIGHT}",
         mean_frame_kb=round(np.mean([f.stat().st_size for f in (one / "video_0000").iterdir()]) / 1024, 1),
         build_s=round(time.perf_counter() - t0, 1), cpus=os.cpu_count(), load_avg=os.getloadavg()[0])

    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(repeats):  # interleaved, so a busy spell on a shared box hits every loader alike
        for cores in cores_list:
            for loader in loaders:
                runs.setdefault((loader, cores), []).append(
                    measure(loader, one, cores, args.task_cpus, args.samples_per_task))
    # Two bases, best run of each: wall clock (frames/s per pinned core) and CPU time (frames per
    # CPU-second of the loader's whole process tree), which other load on the machine barely moves.
    wall = {k: max(rs, key=lambda r: r["fps"]) for k, rs in runs.items()}
    cpu = {k: max(rs, key=lambda r: r["frames_per_cpu_s"]) for k, rs in runs.items()}
    for (loader, cores), r in sorted(wall.items()):
        emit(figure="frames_per_s_per_core", loader=loader, cores=cores, value=round(r["fps"] / cores, 1),
             frames=r["frames"], seconds=round(r["seconds"], 2), peak_rss_mb=r["peak_rss_mb"])
        emit(figure="frames_per_cpu_s", loader=loader, cores=cores,
             value=round(cpu[(loader, cores)]["frames_per_cpu_s"], 1))

    summary = {}
    for vidgen in [name for name in ("vidgen_ray", "vidgen_local") if name in loaders]:
        for cores in cores_list:
            for basis, table, key in (("wall", wall, "fps"), ("cpu", cpu, "frames_per_cpu_s")):
                for base, goal, name in (("pil_loader", 2.5, "vs_pil_loader"),
                                         ("decode_floor", 0.8, "vs_decode_floor")):
                    if (base, cores) in table:
                        ratio = table[(vidgen, cores)][key] / table[(base, cores)][key]
                        emit(figure=f"ratio_{name}", loader=vidgen, cores=cores, basis=basis,
                             value=round(ratio, 2), goal=goal, met=ratio >= goal)
                        summary[f"{vidgen}_{name}_{cores}c_{basis}"] = round(ratio, 2)
        if len(cores_list) == 2:
            scale = wall[(vidgen, 2)]["fps"] / wall[(vidgen, 1)]["fps"]
            efficiency = cpu[(vidgen, 2)]["frames_per_cpu_s"] / cpu[(vidgen, 1)]["frames_per_cpu_s"]
            emit(figure="scaling_2_vs_1_cores", loader=vidgen, value=round(scale, 2), goal=1.7,
                 met=scale >= 1.7, cpu_efficiency_2_vs_1=round(efficiency, 2))
            summary[f"{vidgen}_scaling"] = round(scale, 2)
            summary[f"{vidgen}_cpu_efficiency_2_vs_1"] = round(efficiency, 2)

    # Memory: the same loader on 1x and 10x the corpus, at the largest core count.
    cores = cores_list[-1]
    for vidgen in [name for name in ("vidgen_ray", "vidgen_local") if name in loaders]:
        small, large = wall[(vidgen, cores)], measure(vidgen, ten, cores, args.task_cpus, args.samples_per_task)
        for key in ("peak_rss_mb", "peak_pss_mb"):
            emit(figure=key, loader=vidgen, cores=cores, corpus_1x=small[key], corpus_10x=large[key],
                 ratio=round(large[key] / small[key], 3), goal=1.25, met=large[key] / small[key] <= 1.25,
                 fps_10x_per_core=round(large["fps"] / cores, 1))
            summary[f"{vidgen}_{key}_ratio_10x"] = round(large[key] / small[key], 3)
    emit(figure="summary", **summary, load_avg_end=os.getloadavg()[0],
         total_s=round(time.perf_counter() - t0, 1))


if __name__ == "__main__":
    main()
