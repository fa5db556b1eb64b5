"""Cost of the history-adaptive clippers: each + adam vs adam alone, one interleaved run.

python -m benchmarks.adaptive_adam [--sizes 8e6] [--leaves 8,64]
"""

from __future__ import annotations

import optax

import clipjax
from benchmarks.clip_adam import ratio_main


def variants(lr: float = 1e-3) -> dict[str, optax.GradientTransformation]:
  return {
      "adam": optax.adam(lr),
      "autoclip+adam": optax.chain(clipjax.autoclip(10.0), optax.adam(lr)),
      "zclip+adam": optax.chain(clipjax.zclip(), optax.adam(lr)),
      "skip_spikes(adam)": clipjax.skip_spikes(optax.adam(lr), use_loss=False),
      "skip_spikes(zclip+adam)": clipjax.skip_spikes(
          clipjax.chain(clipjax.zclip(), optax.adam(lr)), use_loss=False
      ),
  }


def main(argv=None):
  ratio_main(variants, __doc__, "8e6", argv)


if __name__ == "__main__":
  main()
