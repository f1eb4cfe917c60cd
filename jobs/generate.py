"""Entrypoint for `ray job submit`: `vidgen generate` on the cluster the job runs in.

    ray job submit --runtime-env jobs/runtime_env.yaml -- \
        python jobs/generate.py --config jobs/configs/generate_opv2v_svd.yaml [key=value ...]

Inside a Ray job RAY_ADDRESS is set, so vidgen joins that cluster instead of starting a local one. Outputs go
to generate.output (videos/, manifest.jsonl); rerunning the same command generates only the missing videos.
"""

import sys

from vidgen.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
