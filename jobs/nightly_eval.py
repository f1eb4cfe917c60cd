"""Entrypoint: the nightly eval (generate the suite -> FVD/KVD -> compare with the last good night -> report).

    # in a Ray job (RayCronJob, CronJob fallback) or on this machine:
    python jobs/nightly_eval.py --config jobs/configs/nightly_eval.yaml [key=value ...]
    # from a scheduler outside the cluster: submit once per night as nightly-<suite>-<date>, wait for the status
    python jobs/nightly_eval.py --submit http://HEAD:8265 --config jobs/configs/nightly_eval.yaml [--retry]

Exit status: 0 ok; 1 regressed, or the submitted job FAILED or was STOPPED; 2 bad input.
Inside a Ray job RAY_ADDRESS is set, so vidgen joins that cluster instead of starting a local one.
"""

import sys

from vidgen.eval.nightly_job import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
