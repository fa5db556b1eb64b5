"""clipjax: composable, overflow-safe gradient clipping for Optax.

Every clipper is an ``optax.GradientTransformationExtraArgs`` that records
what it did (pre-clip norm, scale, clipped flag, counts) in its state.
"""

from clipjax._adaptive import AdaGCState, AutoClipState, ZClipState, adagc, autoclip, zclip
from clipjax._base import ClipState, PerLeaf
from clipjax._clipping import (
    adaptive_grad_clip,
    clip_by_block_rms,
    clip_by_given_norm,
    clip_by_global_norm,
    clip_by_group_norm,
    clip_by_norm,
    clip_by_value,
)
from clipjax._leaf_norms import LeafNormsState, record_leaf_norms
from clipjax._numerics import global_norm, leaf_norms
from clipjax._per_example import DPNoiseState, PerExampleClipState, dp_noise, per_example_clip
from clipjax._skipping import SkipSpikesState, chain, skip_spikes
from clipjax._spam import SpamState, spam
from clipjax._stats import clip_stats, register_stats_type
from clipjax._writers import JsonlWriter, StatsLogger, TensorBoardWriter

__version__ = "0.1.0"

__all__ = [
    "AdaGCState",
    "AutoClipState",
    "ClipState",
    "DPNoiseState",
    "JsonlWriter",
    "LeafNormsState",
    "PerExampleClipState",
    "PerLeaf",
    "SkipSpikesState",
    "SpamState",
    "StatsLogger",
    "TensorBoardWriter",
    "ZClipState",
    "adagc",
    "adaptive_grad_clip",
    "autoclip",
    "chain",
    "clip_by_block_rms",
    "clip_by_given_norm",
    "clip_by_group_norm",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "clip_stats",
    "dp_noise",
    "global_norm",
    "leaf_norms",
    "per_example_clip",
    "record_leaf_norms",
    "register_stats_type",
    "skip_spikes",
    "spam",
    "zclip",
]
