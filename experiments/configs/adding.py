"""The adding problem (Hochreiter & Schmidhuber 1997; Pascanu et al. 2013): long dependencies."""

import ml_collections

from experiments.configs import explosion


def get_config() -> ml_collections.ConfigDict:
  c = explosion.get_config()
  c.task = "adding"
  c.length = 50
  c.n_train = 10_000
  c.n_eval = 1_000
  c.batch_size = 64
  c.num_epochs = 10
  c.eval_every = 500
  c.loss_reduction = "mean"
  c.model.srn_init = "xavier"
  c.optimizer.learning_rate = 0.05
  c.clip.name = "global_norm"
  c.clip.threshold = 1.0
  return c
