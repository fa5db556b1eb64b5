"""The book's gradient-explosion setup (NNDL, chapter 6): SRN on digit sum of length 20.

SGD lr 0.2, batch 64 (no shuffle), summed cross-entropy, 50 epochs, dev eval
every 100 steps, test on the best-dev params. No clipping by default; add it
with e.g. ``--config.clip.name=global_norm --config.clip.threshold=20``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "digit_sum"
  c.length = 20
  c.data_seed = 0  # the book seeds NumPy with 0 before generating
  c.n_train = 0  # only for generated tasks other than digit_sum
  c.n_eval = 0
  c.seed = 0  # model initialisation
  c.batch_size = 64
  c.num_epochs = 50
  c.eval_every = 100
  c.loss_reduction = "sum"
  # Full float32 matmuls, as the book's float32 runs. "default" lets the backend
  # choose: TF32 on NVIDIA GPUs since Ampere (a 4% error on the SRN's logits
  # measured on an H100), bfloat16 passes on TPUs.
  c.matmul_precision = "highest"

  c.model = ml_collections.ConfigDict()
  c.model.cell = "srn"
  c.model.embed_size = 32
  c.model.hidden_size = 32
  c.model.srn_init = "zeros"  # the book's PyTorch port; 'xavier' = Paddle's variant
  c.model.freeze_embedding = False  # True: the seed's PyTorch (embedding never trained)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.2
  c.optimizer.momentum = 0.0

  c.clip = ml_collections.ConfigDict()
  c.clip.name = "none"  # or any of experiments.optim.CLIPPERS
  c.clip.threshold = 20.0  # the clipper's main hyperparameter
  c.clip.nonfinite = "propagate"
  c.clip.skip_spikes = False  # wrap the optimizer in clipjax.skip_spikes
  c.clip.kwargs = ml_collections.ConfigDict()  # further keyword arguments

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1  # data-parallel over this many local devices (-1: all)

  c.tensorboard = True
  c.progress = True
  c.halt_after_step = -1  # tests: stop after this step as if killed
  return c
