"""Launch an experiment.

    python -m experiments.main --config=experiments/configs/explosion.py --workdir=DIR

Override any field: --config.clip.name=global_norm --config.clip.threshold=20.
A workdir holding checkpoints resumes from the latest one.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file with get_config().",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and the summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax logs every save at INFO through absl; keep the console for progress.
  logging.set_verbosity(logging.WARNING)
  logging.info("config:\n%s", FLAGS.config)
  summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in summary.items()))


if __name__ == "__main__":
  app.run(main)
