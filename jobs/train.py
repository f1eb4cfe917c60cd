"""Entrypoint for `ray job submit`: `vidgen train` on the cluster the job runs in.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/demo.yaml [key=value ...]

Inside a Ray job RAY_ADDRESS is set, so vidgen joins that cluster instead of starting a local one.
"""

import sys

from vidgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
