"""clipjax: composable, overflow-safe gradient clipping for Optax.

Every clipper is an ``optax.GradientTransformationExtraArgs`` that records
what it did (pre-clip norm, scale, clipped flag, counts) in its state.
"""

from clipjax._agc import adaptive_grad_clip
from clipjax._autoclip import AutoClipState, autoclip
from clipjax._block_rms import clip_by_block_rms
from clipjax._chain import chain
from clipjax._global_norm import clip_by_global_norm
from clipjax._leaf_norm import clip_by_norm
from clipjax._norms import global_norm, leaf_norms
from clipjax._skip import SkipSpikesState, skip_spikes
from clipjax._state import ClipState
from clipjax._stats import clip_stats, register_stats_type
from clipjax._value import clip_by_value
from clipjax._zclip import ZClipState, zclip

__version__ = "0.1.0"

__all__ = [
    "AutoClipState",
    "ClipState",
    "SkipSpikesState",
    "ZClipState",
    "adaptive_grad_clip",
    "autoclip",
    "chain",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "clip_stats",
    "global_norm",
    "leaf_norms",
    "register_stats_type",
    "skip_spikes",
    "zclip",
]
