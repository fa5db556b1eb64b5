"""What is computed: overflow-safe norms of gradient pytrees and clip factors.

The math, apart from how XLA is made to compile it (`clipjax._shaping`):

- `split`: the split form ``r * 2**e`` of a norm, combining norms, and clip
  factors that never flush to zero;
- `sums`: each unit's power sum at a safe scale, the rescue decision and the
  rescued sums (`flat_norms`);
- `tree`: the norms of a pytree (the public `global_norm`,
  `leaf_norms`).

The clippers call these with the trace's `clipjax._forms.Forms`.
"""

from clipjax._numerics.split import Split, clip_factors, combine, ldexp, normalize, pow2, psum_norm
from clipjax._numerics.sums import (
    AxesArg,
    abs_max,
    accumulation_dtype,
    flat_norms,
    tree_norms,
    unitwise_clip,
    value_stats,
    wide,
)
from clipjax._numerics.tree import global_norm, leaf_norms, tree_global_norm

__all__ = [
    "AxesArg",
    "Split",
    "abs_max",
    "accumulation_dtype",
    "clip_factors",
    "combine",
    "flat_norms",
    "global_norm",
    "ldexp",
    "leaf_norms",
    "normalize",
    "pow2",
    "psum_norm",
    "tree_global_norm",
    "tree_norms",
    "unitwise_clip",
    "value_stats",
    "wide",
]
