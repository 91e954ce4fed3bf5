"""Baseline concept sets (post-hoc methods the FaCT paper compares against)."""

from fact_model.baselines.craft import CraftConcepts

__all__ = ["CraftConcepts"]
