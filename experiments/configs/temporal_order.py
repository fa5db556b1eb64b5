"""The temporal-order problem (Hochreiter & Schmidhuber 1997, 6a): classify the order of X/Y."""

import ml_collections

from experiments.configs import explosion


def get_config() -> ml_collections.ConfigDict:
  c = explosion.get_config()
  c.task = "temporal_order"
  c.length = 100
  c.n_train = 10_000
  c.n_eval = 1_000
  c.batch_size = 64
  c.num_epochs = 10
  c.eval_every = 500
  c.loss_reduction = "mean"
  c.model.cell = "lstm"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.clip.name = "global_norm"
  c.clip.threshold = 1.0
  return c
