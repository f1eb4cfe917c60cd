"""The `vidgen` command.

    vidgen demo                                  the whole system, small, on this machine
    vidgen train    --config C [key=value ...]   fine-tune on a Ray cluster (local if none)
    vidgen generate --config C [key=value ...]   batch long-video generation
    vidgen eval     --config C [key=value ...]   FVD / KVD of generated against real clips
    vidgen eval fvd --real SRC --fake SRC [--json] [--i3d-weights P] [key=value ...]
    vidgen plan     --config C [key=value ...]   memory per GPU and time of training or generation (no weights)
    vidgen config show C [key=value ...]         print the resolved config
    vidgen prepare synth OUT                     write a synthetic clip dataset
    vidgen prepare pack SOURCE --out URI         pack clips into parquet shards (resumable)
    vidgen prepare opv2v ROOT --out URI          OPV2V front-camera clips in the hotshot layout
    vidgen prepare latents --config C [k=v ...]  encode clips once into a latent cache (data.latents)
    vidgen data inspect SOURCE [--layout L]      counts, histograms, bad samples

Bad input ends with one line on stderr naming the key, file or URI and what was expected, and exit
status 2; `--debug` shows the stack trace instead.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys

from vidgen import config
from vidgen.access import credentials_refused
from vidgen.errors import VidgenError, raised_remotely
from vidgen.redact import install_log_filter, redact
from vidgen.signals import raising

OVERRIDES_HELP = ("config overrides as dotted key=value pairs, applied after the file, e.g. "
                  "train.lr=1e-4 train.zero_stage=3 data.source=s3://bucket/clips")
CONFIG_HELP = "YAML config file (jobs/configs/*.yaml); keys it omits take their defaults"


def _add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # A subcommand's defaults would overwrite `vidgen --debug CMD`'s value: only the top level sets one.
    default = False if top else argparse.SUPPRESS
    p.add_argument("--debug", action="store_true", default=default, help="show full stack traces on errors")
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="log at INFO level (default: warnings only)")


def _add_job(sub, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=description,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", metavar="CONFIG", help=CONFIG_HELP)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    _add_common(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vidgen",
        description="Train and evaluate video diffusion models on a Ray cluster: ingest, DeepSpeed "
                    "fine-tuning, long-video generation, FVD, all logged to MLflow.",
        epilog="Run `vidgen demo` first: it shows every stage working on this machine.",
    )
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run every stage end to end on tiny models (minutes on a laptop)",
                       description="Synthesize moving-shape clips, ingest them with Ray Data, fine-tune a tiny "
                                   "SVD on 2 Ray Train workers under DeepSpeed ZeRO-2, generate videos longer "
                                   "than the model's window with FIFO diagonal denoising, compute FVD with a "
                                   "tiny I3D, and log all of it to one MLflow run.")
    p.add_argument("--workdir", default="./work/demo",
                   help="where data, checkpoints, videos and the MLflow store go (default: ./work/demo)")
    p.add_argument("--videos", type=int, default=12, help="synthetic clips to create (default: 12)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    _add_common(p)

    _add_job(sub, "train", "fine-tune a video diffusion model (Ray Train + DeepSpeed)",
             "Stream clips from data.source with Ray Data into train.num_workers Ray Train workers under "
             "DeepSpeed ZeRO (train.zero_stage), checkpoint to train.storage_path, resume automatically when "
             "the same run.name is started again, and export the trained UNet beside the checkpoints, to "
             "<train.storage_path>/<run.name>/export/unet.")
    _add_job(sub, "generate", "generate videos for a prompt file on an actor pool",
             "Fan the rows of generate.prompts out to generate.num_actors actors; each writes "
             "its video atomically under <generate.output>/videos/ (VBench sources: {prompt}-{i}.mp4; else "
             "<id>-<hash>.mp4) and a row to manifest.jsonl. Finished videos are skipped on a rerun.")
    _add_eval(sub)
    p = _add_job(sub, "plan", "memory per GPU and time of a training or generation config, before renting GPUs",
                 "Build the config's model on the meta device (no weights read, no memory). Training: total and "
                 "trainable parameters, FLOPs per step (counted), peak memory per GPU for the config's ZeRO "
                 "stage, offload, precision, checkpointing and batch (weights, gradients, optimizer states, "
                 "activations), whether it fits each GPU kind, and the step time at --mfu. Generation: peak memory "
                 "per actor at the configured size and sampler, UNet evaluations and time per video.")
    p.add_argument("--job", choices=("auto", "train", "generate"), default="auto",
                   help="what to plan (default auto: generation for a config with a generate section and no train "
                        "section, else training)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for step times (default: 0.4)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--decode-fps-per-core", type=float, default=None, metavar="F",
                   help="frames/s one CPU core decodes and resizes (benchmarks/ingest.py measures it): gives the "
                        "CPU cores per GPU that keep data-wait under 2%% when training from clips")
    p.add_argument("--probe", action="store_true",
                   help="measure that decode rate on a few clips of data.source instead")
    p.add_argument("--dataset-clips", type=int, default=None, metavar="N",
                   help="clips in the dataset, for the latent cache's size (default: counted in data.source)")

    p = sub.add_parser("config", help="inspect configs", description="Inspect configs.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print the resolved config as YAML",
                           description="Load CONFIG, apply the overrides, validate, and print the result.")
    show.add_argument("config", nargs="?", metavar="CONFIG", help=CONFIG_HELP + " (none: defaults only)")
    show.add_argument("--config", "-c", dest="config_option", metavar="CONFIG", help="the same, as the jobs take it")
    show.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    _add_common(show)

    p = sub.add_parser("prepare", help="write datasets", description="Write datasets in vidgen's layouts.")
    psub = p.add_subparsers(dest="prepare_command", metavar="ACTION", required=True)
    synth = psub.add_parser("synth", help="synthetic moving-shape clips in the hotshot layout",
                            description="Write OUT/<sample>/<n>.png frames plus prompt.txt: coloured shapes "
                                        "moving on plain backgrounds, deterministic for --seed.")
    synth.add_argument("out", metavar="OUT", help="output root (path or URI)")
    synth.add_argument("--videos", type=int, default=12, help="number of clips (default: 12)")
    synth.add_argument("--frames", type=int, default=16, help="frames per clip (default: 16)")
    synth.add_argument("--height", type=int, default=64, help="frame height in pixels (default: 64)")
    synth.add_argument("--width", type=int, default=64, help="frame width in pixels (default: 64)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    synth.add_argument("--format", choices=("png", "jpg"), default="png", help="frame format (default: png)")
    _add_common(synth)

    layouts = ("auto", "hotshot", "frames", "videos", "opv2v", "sthv2", "shards")
    pack = psub.add_parser("pack", help="pack clips into parquet shards (the fast path for object storage)",
                           description="Read SOURCE like training does and write its clips as parquet shards "
                                       "under --out, atomically; a rerun skips the shards already written.")
    pack.add_argument("source", metavar="SOURCE", help="dataset root (path or URI)")
    pack.add_argument("--layout", choices=layouts, default="auto", help="layout of SOURCE (default: auto)")
    pack.add_argument("--out", required=True, help="output root for the shards (path or URI)")
    pack.add_argument("--num-frames", type=int, default=16, help="frames per clip (default: 16)")
    pack.add_argument("--height", type=int, default=None, help="clip height in pixels (required unless --buckets)")
    pack.add_argument("--width", type=int, default=None, help="clip width in pixels (required unless --buckets)")
    pack.add_argument("--max-bad-fraction", type=float, default=0.05,
                      help="fail when more than this fraction of samples is skipped (default: 0.05)")
    pack.add_argument("--buckets", default=None, help="aspect buckets instead of a size: hotshot-512, svd or WxH,...")
    pack.add_argument("--fps", type=float, default=None, help="target fps (default: every source frame)")
    pack.add_argument("--source-fps", type=float, default=8.0, help="fps of frame folders (default: 8)")
    pack.add_argument("--clips-per-video", type=int, default=1, help="clips per video (default: 1)")
    pack.add_argument("--camera", type=int, default=0, help="OPV2V camera (default: 0, front)")
    pack.add_argument("--clips-per-shard", type=int, default=64, help="clips per parquet shard (default: 64)")
    pack.add_argument("--frame-format", choices=("jpeg", "png", "mp4"), default="jpeg",
                      help="how frames are stored: jpeg (small), png (lossless), mp4 (smallest)")
    pack.add_argument("--quality", type=int, default=95, help="JPEG quality (default: 95)")
    pack.add_argument("--parallel", action="store_true", help="one Ray task per shard (starts a local Ray)")
    _add_common(pack)

    lat = psub.add_parser("latents", help="encode clips once into a latent cache that training reads",
                          description="Read data.source like training does (centre crops, evenly spread clips), "
                                      "encode every clip with the recipe's frozen encoders (VAE posterior, CLIP "
                                      "image or SDXL text embeddings) in a Ray Data actor pool, and write parquet "
                                      "shards under latents.output (default <run.workdir>/latents), atomically; a "
                                      "rerun writes only the unfinished shards. Train on it with "
                                      "data.latents=URI and the same config.")
    lat.add_argument("--config", metavar="CONFIG", help=CONFIG_HELP)
    lat.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    lat.add_argument("--local", action="store_true", help="encode in this process instead of Ray actors")
    _add_common(lat)

    opv = psub.add_parser("opv2v", help="front-camera clips of 2-5 s from an OPV2V tree, in the hotshot layout",
                          description="Cut each CAV's camera sequence of the OpenCOOD tree at ROOT into clips "
                                      "and write them as <clip>/<n>.jpg + prompt.txt under --out, resumably.")
    opv.add_argument("root", metavar="ROOT", help="OPV2V root holding train/ validate/ test/ (path or URI)")
    opv.add_argument("--out", required=True, help="output root (path or URI)")
    opv.add_argument("--camera", type=int, default=0, help="camera 0-3 (default: 0, front)")
    opv.add_argument("--min-seconds", type=float, default=2.0, help="shortest clip in seconds (default: 2)")
    opv.add_argument("--max-seconds", type=float, default=5.0, help="longest clip in seconds (default: 5)")
    opv.add_argument("--fps", type=float, default=None, help="output fps, strided from 10 Hz (default: 10)")
    opv.add_argument("--prompt-template", default=None,
                     help="prompt with {scenario}, {split}, {cav} (default: a front camera driving video, ...)")
    _add_common(opv)

    p = sub.add_parser("data", help="look at datasets", description="Look at datasets without training.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ins = dsub.add_parser("inspect", help="counts, histograms and bad samples of a dataset, in seconds",
                          description="List SOURCE, read headers only, and print sample counts, frame-count / "
                                      "size / fps histograms and every sample the ingest would skip, with why.")
    ins.add_argument("source", metavar="SOURCE", help="dataset root (path or URI)")
    ins.add_argument("--layout", choices=layouts, default="auto", help="layout of SOURCE (default: auto)")
    ins.add_argument("--num-frames", type=int, default=None, help="list samples too short for one clip as bad")
    ins.add_argument("--fps", type=float, default=None, help="target fps used with --num-frames")
    ins.add_argument("--source-fps", type=float, default=8.0, help="fps of frame folders (default: 8)")
    ins.add_argument("--camera", type=int, default=0, help="OPV2V camera (default: 0)")
    ins.add_argument("--first-header-only", action="store_true",
                     help="read one frame header per folder (faster on object storage; blind to mixed sizes)")
    ins.add_argument("--decode", action="store_true",
                     help="also decode every frame as training would, in parallel Ray tasks (finds what headers "
                          "cannot: a JPEG truncated after its header); slower, reads all the data")
    ins.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_common(ins)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        # Ray Data configures its own loggers on import and, off a terminal, logs every operator's
        # progress at INFO every 10 s; its level comes from this variable. Terminals keep the progress bars.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its logger's level on import
        for name in ("mlflow", "ray.train"):
            logging.getLogger(name).setLevel(logging.WARNING)
    install_log_filter()  # credentials never reach a log line


def _add_eval(sub) -> None:
    p = _add_job(sub, "eval", "FVD / KVD and model-free metrics of generated against real clips",
                 "Cut the real and generated sets into eval.num_frames-frame clips (generated videos at "
                 "eval.windows: early / middle / late), embed them with I3D or VideoMAE-v2 (eval.features; "
                 "eval.protocol: a published tool's conventions), and log FVD, KVD, per-window values and "
                 "per-video temporal flickering and motion magnitude to MLflow. The real set's features are "
                 "cached under eval.cache_dir.\n\n"
                 "  vidgen eval --config C [key=value ...]      sets from eval.real / eval.generated\n"
                 "  vidgen eval fvd --real SRC --fake SRC [--json] [--i3d-weights P | --videomae-weights P] "
                 "[key=value ...]\n\n"
                 "SRC is a dataset root in any data layout (--real-layout) or a generation output folder.")
    p.usage = ("vidgen eval [fvd] [--config C] [--real SRC] [--fake SRC] [--real-layout L] [--fake-layout L] "
               "[--i3d-weights P] [--videomae-weights P] [--json] [key=value ...]")
    layouts = ("auto", "hotshot", "frames", "videos", "opv2v", "sthv2", "shards")
    p.add_argument("--real", metavar="SRC", help="real clips: a dataset root or URI (default: eval.real, "
                                                  "else data.source)")
    p.add_argument("--fake", metavar="SRC", help="generated videos: a folder or URI (default: eval.generated, "
                                                  "else generate.output)")
    p.add_argument("--real-layout", choices=layouts, help="layout of --real (default: eval.real_layout, "
                                                          "else data.layout)")
    p.add_argument("--fake-layout", choices=("auto", "videos", "frames", "hotshot"),
                   help="layout of --fake (default: eval.generated_layout, videos)")
    p.add_argument("--i3d-weights", metavar="PATH", help="400-class I3D state dict (i3d_pretrained_400.pt); "
                                                         "sets eval.i3d_flavor=pretrained")
    p.add_argument("--videomae-weights", metavar="PATH",
                   help="VideoMAE-v2 ViT-g checkpoint (cd-fvd's vit_g_hybrid_pt_1200e_ssv2_ft.pth); sets "
                        "eval.features=videomae (content-debiased FVD) and eval.videomae_flavor=pretrained")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout: fvd, kvd, "
                                                       "n_real, n_fake, windows, metrics, params, warnings")


def _eval_config(args, cfg) -> None:
    """Apply the `vidgen eval` options to a loaded config (assignment is validated field by field)."""
    if args.real:
        cfg.eval.real = args.real
    if args.fake:
        cfg.eval.generated = args.fake
    if args.real_layout:
        cfg.eval.real_layout = args.real_layout
    if args.fake_layout:
        cfg.eval.generated_layout = args.fake_layout
    if args.i3d_weights:
        cfg.eval.i3d_path = args.i3d_weights  # path first: pretrained without a path is refused
        cfg.eval.i3d_flavor = "pretrained"
    if args.videomae_weights:
        cfg.eval.videomae_path = args.videomae_weights
        cfg.eval.videomae_flavor = "pretrained"
        cfg.eval.features = "videomae"


def _eval_text(out: dict) -> str:
    def ci(name: str, v: dict, fmt: str) -> str:  # " [lo, hi]" when the bootstrap interval was computed
        lo, hi = v.get(f"{name}_lo"), v.get(f"{name}_hi")
        return "" if lo is None or hi is None or lo != lo else f" [{lo:{fmt}}, {hi:{fmt}}]"

    lines = [f"FVD {out['fvd']:.4f}{ci('fvd', out, '.4f')}  KVD {out['kvd']:.6f}{ci('kvd', out, '.6f')}  "
             f"(n_real={out['n_real']}, n_fake={out['n_fake']}, protocol "
             f"{out.get('params', {}).get('fvd.protocol', '?')}, real cache: {out['real_cache']})"]
    lines += [f"  {w}: FVD {v['fvd']:.4f}{ci('fvd', v, '.4f')}  KVD {v['kvd']:.6f}  (n_fake={v['n_fake']})"
              for w, v in out["windows"].items()]
    lines += [f"  {k}: {v:.4f}" for k, v in out["metrics"].items() if k.endswith("_mean")]
    lines += [f"warning: {w}" for w in out["warnings"]]
    if out.get("mlflow_run_id"):
        lines.append(f"MLflow run {out['mlflow_run_id']}: {out.get('mlflow_ui', '')}")
    return "\n".join(lines)


def _run_job(args, name: str) -> dict:
    from vidgen.ray_env import init_ray  # lazy: loads fsspec; jobs load only when one runs
    from vidgen.runner import (
        check_outputs_shared,
        eval_job,
        generate_job,
        prepare_eval,
        prepare_train,
        tracker_for,
        train_job,
    )

    cfg = config.load_config(args.config, args.overrides)
    if name == "eval":
        from vidgen.eval.job import check_weights  # lazy: loads torch

        _eval_config(args, cfg)
        check_weights(cfg)  # I3D / VideoMAE weights open and fit, before Ray starts
    if name == "train":
        from vidgen.train.launch import check  # lazy: loads Ray, PyArrow, PIL

        check(cfg)  # refuse bad combinations before starting Ray
    if name == "generate":
        from vidgen.generate.job import prepare_rows  # lazy: loads torch, PIL

        prepare_rows(cfg)  # a bad prompt file fails here, in a second, before Ray starts
    init_ray(cfg)
    check_outputs_shared(cfg, name)  # before the MLflow run: a refused job leaves nothing behind
    fn = {"train": train_job, "generate": generate_job, "eval": eval_job}[name]
    if name == "train":  # data, outputs and weights too: a refused training job opens no MLflow run
        fn = functools.partial(train_job, data=prepare_train(cfg))
    if name == "eval":  # both sets listed and sampled: a refused evaluation opens no MLflow run either
        fn = functools.partial(eval_job, inputs=prepare_eval(cfg))
    # SIGTERM (Kubernetes, `ray job stop`) ends a job as Ctrl-C does, said and its run closed (Ray's would exit 15)
    with raising(), tracker_for(cfg, job=name) as tracker:
        tracker.log_config(cfg.to_dict())
        tracker.set_tags({"vidgen.job": name})
        out = fn(cfg, tracker)
        out["mlflow_run_id"] = tracker.run_id
        out["mlflow_ui"] = tracker.ui_command()
    return out


def _prepare(args) -> None:
    if args.prepare_command == "synth":
        from vidgen.data.synth import make_moving_shapes  # lazy: loads PIL, fsspec

        uris = make_moving_shapes(args.out, args.videos, args.frames, args.height, args.width,
                                  seed=args.seed, fmt=args.format)
        print(f"wrote {len(uris)} clips under {args.out}")
    elif args.prepare_command == "pack":
        from vidgen.data.pack import pack  # lazy: loads PIL, fsspec

        if args.parallel:
            from vidgen.ray_env import init_ray  # lazy: loads fsspec

            init_ray(config.load_config(None, []))
        manifest = pack(args.source, args.layout, args.out, clips_per_shard=args.clips_per_shard,
                        frame_format=args.frame_format, quality=args.quality, parallel=args.parallel,
                        num_frames=args.num_frames, height=args.height, width=args.width, buckets=args.buckets,
                        fps=args.fps, source_fps=args.source_fps, clips_per_video=args.clips_per_video,
                        camera=args.camera, max_bad_fraction=args.max_bad_fraction)
        print(f"{manifest.get('clips')} clips in {len(manifest.get('shards', []))} shards under {args.out}")
    elif args.prepare_command == "latents":
        from vidgen.ray_env import init_ray  # lazy: loads fsspec, PIL
        from vidgen.train.latents import cache_uri, prepare_latents

        cfg = config.load_config(args.config, args.overrides)
        if not args.local:
            from vidgen.runner import check_outputs_shared  # lazy: loads fsspec

            init_ray(cfg)
            check_outputs_shared(cfg, "latents")

        def progress(n: int, total: int, shard: int) -> None:
            print(f"\rshards {n}/{total} (last: {shard})", end="", file=sys.stderr, flush=True)

        m = prepare_latents(cfg, use_ray=not args.local, progress=progress)
        print(f"\n{m['clips']} clips in {len(m['shards'])} shards under {cache_uri(cfg)}: {m['written']} written, "
              f"{m['existing']} already there, {m['report']['skipped']} samples skipped, {m['seconds']} s")
    elif args.prepare_command == "opv2v":
        from vidgen.data.opv2v_prepare import prepare_opv2v  # lazy: loads PIL, fsspec

        kw = {"prompt_template": args.prompt_template} if args.prompt_template else {}
        result = prepare_opv2v(args.root, args.out, camera=args.camera, min_seconds=args.min_seconds,
                               max_seconds=args.max_seconds, fps=args.fps, **kw)
        print(json.dumps(result, indent=2, default=str))


def _split_eval_fvd(argv: list[str]) -> tuple[list[str], bool]:
    """Drop the optional `fvd` word after `eval` (argparse cannot put a positional before options and
    key=value positionals after them); say whether it was there."""
    for i, arg in enumerate(argv):
        if not arg.startswith("-"):
            if arg == "eval" and argv[i + 1:i + 2] == ["fvd"]:
                return argv[:i + 1] + argv[i + 2:], True
            break
    return argv, False


def _one_line(e: BaseException) -> str:
    """The error's message on one line (a list of problems joined by "; "), credentials masked (vidgen.redact)."""
    return redact("; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__)


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # file names that are not UTF-8 print escaped, never crash a report
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    argv, eval_fvd = _split_eval_fvd(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    _setup_logging(getattr(args, "verbose", False))
    try:
        if args.command == "config":
            path, overrides = args.config, list(args.overrides)
            if args.config_option:  # `config show --config C key=value ...`: the positional is an override
                path, overrides = args.config_option, [p for p in (args.config,) if p] + overrides
            elif path and "=" in path and not os.path.exists(path):  # `config show key=value ...`: no file
                path, overrides = None, [path, *overrides]
            print(redact(config.load_config(path, overrides).to_yaml()), end="")
        elif args.command == "prepare":
            _prepare(args)
        elif args.command == "data":
            from vidgen.data.inspect import format_report, inspect_source  # lazy: loads PIL, fsspec

            if args.decode:
                from vidgen.ray_env import init_ray  # lazy: loads fsspec; only --decode starts Ray

                init_ray(config.load_config(None, []))
            report = inspect_source(args.source, args.layout, num_frames=args.num_frames, fps=args.fps,
                                    source_fps=args.source_fps, camera=args.camera,
                                    all_headers=not args.first_header_only, decode=args.decode)
            print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
        elif args.command == "demo":
            from vidgen.demo import DemoSizes, run_demo  # lazy: loads fsspec

            print(run_demo(args.workdir, args.overrides, DemoSizes(videos=args.videos)).text())
        elif args.command == "plan":
            from vidgen.plan_generate import format_job, plan_job  # lazy: loads torch

            path, overrides = args.config, list(args.overrides)
            if path is None and overrides and "=" not in overrides[0]:  # `vidgen plan CONFIG`, as the issue spells it
                path = overrides.pop(0)
            out = plan_job(path, overrides, args.job, mfu=args.mfu, decode_fps=args.decode_fps_per_core,
                           probe=args.probe, dataset_clips=args.dataset_clips)
            print(json.dumps(out) if args.json else format_job(out))
        elif args.command == "eval" and eval_fvd:
            with contextlib.redirect_stdout(sys.stderr):  # --json: nothing but the object reaches stdout
                out = _run_job(args, "eval")
            print(json.dumps(out, default=str) if args.json else _eval_text(out))
        else:
            out = _run_job(args, args.command)
            print(json.dumps(out, default=str) if getattr(args, "json", False) else json.dumps(out, indent=2,
                                                                                                default=str))
    except VidgenError as e:
        if debug:
            raise
        print(f"vidgen: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM too in jobs (vidgen.signals): 128 + the signal's number
        print(f"vidgen: {_one_line(e) if str(e) else 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception as e:  # a bug, not bad input: still one line, with the way to the stack trace
        if debug:
            raise
        if (original := raised_remotely(e)) is not None:  # a Ray task's or actor's own error, without Ray's wrapper
            print(f"vidgen: error: {_one_line(original)}", file=sys.stderr)
            return 2
        if (refused := credentials_refused(e)) is not None:  # a token or password a service did not accept
            print(f"vidgen: error: {_one_line(refused)}", file=sys.stderr)
            return 2
        print(f"vidgen: internal error: {type(e).__name__}: {_one_line(e)} (a bug in vidgen: rerun with --debug "
              "for the stack trace and report it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
