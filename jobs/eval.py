"""Entrypoint for `ray job submit`: `vidgen eval` (FVD / KVD) on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/eval.py --config jobs/configs/demo.yaml \
        eval.real=s3://bucket/real eval.generated=s3://bucket/generated

Inside a Ray job RAY_ADDRESS is set, so vidgen joins that cluster instead of starting a local one.
"""

import sys

from vidgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
