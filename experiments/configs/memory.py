"""Memory capacity: SRN vs LSTM vs GRU on digit sum by sequence length.

The book's setting for this comparison: Adam lr 1e-3, batch 8, mean
cross-entropy. Sweep ``length`` over 10..35 and ``model.cell``; clip with
``--config.clip.name=global_norm``.
"""

import ml_collections

from experiments.configs import explosion


def get_config() -> ml_collections.ConfigDict:
  c = explosion.get_config()
  c.length = 10
  c.batch_size = 8
  c.num_epochs = 100
  c.eval_every = 380  # every 10 epochs (38 steps each)
  c.loss_reduction = "mean"
  c.model.cell = "srn"
  c.model.srn_init = "xavier"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.clip.name = "none"
  c.clip.threshold = 1.0
  return c
