"""Launch an experiment.

    python -m experiments.main --config=experiments/configs/explosion.py --workdir=DIR

Override any field: --config.clip.name=global_norm --config.clip.threshold=20.
A workdir holding checkpoints resumes from the latest one. Data-parallel over
all devices: --config.mesh.data=-1; over several hosts, start one process per
host with --distributed (see docs/sharding.md).
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and the summary.")
flags.DEFINE_bool("distributed", False,
                  "Call jax.distributed.initialize() first (one process per host). The "
                  "three flags below default to what JAX detects (Cloud TPU, SLURM, ...).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax logs every save at INFO through absl; keep the console for progress.
  logging.set_verbosity(logging.WARNING)
  if FLAGS.distributed:
    # CPU processes need a collectives backend (GPU/TPU have their own; this is ignored there).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info("config:\n%s", FLAGS.config)
  summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in summary.items()))


if __name__ == "__main__":
  app.run(main)
