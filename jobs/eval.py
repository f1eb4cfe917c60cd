"""Entrypoint for `ray job submit`: `vidgen eval` (FVD / KVD, model-free metrics) on the job's cluster.

    ray job submit --working-dir . -- python jobs/eval.py --config jobs/configs/demo.yaml \
        eval.real=s3://bucket/real eval.generated=s3://bucket/generated
    ray job submit --working-dir . -- python jobs/eval.py fvd --real s3://bucket/real \
        --fake s3://bucket/generated --i3d-weights s3://bucket/i3d_pretrained_400.pt --json

Inside a Ray job RAY_ADDRESS is set, so vidgen joins that cluster instead of starting a local one;
the I3D actors take a GPU each when eval.use_gpu=true (default false: they run on the CPU).
"""

import sys

from vidgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
