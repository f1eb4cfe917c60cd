"""Evaluation: I3D features -> FVD / KVD, model-free metrics, the nightly eval job and its report.

Only the pure numpy metrics are re-exported here, so `import vidgen.eval` stays free of torch;
I3D feature extraction lives in `vidgen.eval.features`.
"""

from vidgen.eval.fvd import feature_stats, frechet_distance, fvd, kvd

__all__ = ["feature_stats", "frechet_distance", "fvd", "kvd"]
