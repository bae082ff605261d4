"""SERE: similarity-based expert re-routing for batch decoding of Mixture-of-Experts models.

    import sere
    new_ids = sere.reroute(topk_ids, similarity, select_top_k=1, threshold=0.1)
"""
from sere.config import SereConfig
from sere.routing import BACKENDS, reroute, reroute_with_stats
from sere.stats import RerouteStats

__all__ = ["BACKENDS", "RerouteStats", "SereConfig", "reroute", "reroute_with_stats"]
__version__ = "0.1.0"
