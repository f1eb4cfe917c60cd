"""Evaluation: I3D features -> FVD / KVD, model-free metrics, the nightly eval job and its report.

Only the pure numpy metrics are re-exported here, so `import vidgen.eval` stays free of torch;
I3D feature extraction lives in `vidgen.eval.features`, the Ray job in `vidgen.eval.job`.
"""

from vidgen.eval.fvd import FeatureStats, feature_stats, frechet_distance, fvd, fvd_from_stats, kvd
from vidgen.eval.metrics import motion_magnitude, temporal_flickering, video_metrics

__all__ = ["FeatureStats", "feature_stats", "frechet_distance", "fvd", "fvd_from_stats", "kvd",
           "motion_magnitude", "temporal_flickering", "video_metrics"]
