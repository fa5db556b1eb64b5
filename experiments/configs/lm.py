"""A small decoder-only language model (Flax NNX) under injected faults.

The corpus is generated (a seeded order-2 Markov source, see `experiments.lm`),
so nothing is downloaded and the best achievable loss (the source's entropy
rate) is known. At the steps in `faults.steps` a fault hits the training step:
``'batch'`` replaces the batch by random tokens and multiplies its loss by
`faults.loss_scale` (a corrupted record, or a loss-scaling bug: a gradient far
above the usual), ``'lr'`` multiplies the learning rate by `faults.lr_scale` for
that step. Sized to run on a CPU in seconds per run; scale it up with flags
(``--config.model.width=512 --config.model.depth=8 --config.steps=5000`` ...).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # model initialisation and the batch order
  c.data_seed = 0  # the Markov source
  c.vocab_size = 16
  c.branching = 3  # next tokens a context can lead to (lower: a more predictable source)
  c.seq_len = 32
  c.batch_size = 32
  c.steps = 400
  c.log_every = 50  # rows are buffered on the device and written every this many steps
  c.eval_batches = 8
  # "auto": bfloat16 activations on GPU/TPU, float32 on CPU; or "float32" / "bfloat16".
  c.compute_dtype = "auto"

  c.model = ml_collections.ConfigDict()
  c.model.width = 64
  c.model.depth = 2
  c.model.heads = 4
  c.model.mlp_ratio = 4

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 20

  c.faults = ml_collections.ConfigDict()
  c.faults.kind = "batch"  # "batch", "lr" or "none"
  c.faults.steps = (150, 151, 152, 250)
  c.faults.loss_scale = 1000.0
  c.faults.lr_scale = 30.0

  c.clip = ml_collections.ConfigDict()
  c.clip.name = "none"  # "none", "global_norm" (optax), "zclip" or "skip_spikes" (clipjax)
  c.clip.max_norm = 1.0  # for global_norm
  return c
