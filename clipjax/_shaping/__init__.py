"""How XLA is made to compile it: program forms that equal plain ``jnp`` in value.

Every function here computes what a one-line ``jnp`` expression computes
(a concatenation, a reshape, a slice, a sum per array); its form exists only
because XLA compiles it faster or runs it in fewer passes. README.md lists
each trick: the XLA behaviour it works around, the jax version it was measured
on, the benchmark and test that guard it, and how to retire it.
"""

from clipjax._shaping.arrays import (
    Reduce,
    computed_once,
    concat,
    flatten,
    reduced_shape,
    stack,
    unflatten,
)
from clipjax._shaping.packing import Blocks, packed_values
from clipjax._shaping.parts import split_per_array

__all__ = [
    "Blocks",
    "Reduce",
    "computed_once",
    "concat",
    "flatten",
    "packed_values",
    "reduced_shape",
    "split_per_array",
    "stack",
    "unflatten",
]
