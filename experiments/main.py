"""Launch an experiment.

    python -m experiments.main --config=experiments/configs/explosion.py --workdir=DIR

Override any field: --config.clip.name=global_norm --config.clip.threshold=20.
Extra keyword arguments of the clipper: --config.clip.kwargs.NAME=VALUE (VALUE is
read as a Python literal, else as a string), e.g. --config.clip.kwargs.ord=1.

A workdir holds one run: launched again, it resumes from its latest intact
checkpoint, and refuses a config that differs from the one the run started with
(--allow_config_change=num_epochs lets a run be extended). Data-parallel over
all devices: --config.mesh.data=-1; over several hosts, start one process per
host with --distributed (see docs/sharding.md).

Errors are printed as one line; --verbose prints the traceback too, which is
also written to WORKDIR/error.log.
"""

import ast
import os
import sys
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import rundir, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and the summary.")
flags.DEFINE_list(
    "allow_config_change",
    [],
    f"Config keys that may differ from the workdir's run on resume (any of "
    f"{', '.join(rundir.SAFE_TO_CHANGE)}); num_epochs can only grow.",
)
flags.DEFINE_bool("verbose", False, "Print tracebacks and library INFO logs.")
flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first (one process per host). The "
    "three flags below default to what JAX detects (Cloud TPU, SLURM, ...).",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Number of processes.")
flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])

KWARGS_PREFIX = "--config.clip.kwargs."


def split_clip_kwargs(argv: list[str]) -> tuple[list[str], dict]:
  """Takes the --config.clip.kwargs.NAME=VALUE arguments out of `argv`.

  ml_collections can only override fields the config already has, and
  ``clip.kwargs`` starts empty; these are applied after parsing instead.
  """
  rest, kwargs = [], {}
  for arg in argv:
    if not arg.startswith(KWARGS_PREFIX):
      rest.append(arg)
      continue
    name, sep, value = arg[len(KWARGS_PREFIX) :].partition("=")
    if not sep or not name.isidentifier():
      raise app.UsageError(f"{arg}: expected {KWARGS_PREFIX}NAME=VALUE.")
    try:
      kwargs[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      kwargs[name] = value  # a bare word, e.g. a mode name
  return rest, kwargs


def _report(error: BaseException, workdir: str | None) -> int:
  """One line on stderr (the traceback with --verbose, and in WORKDIR/error.log)."""
  text = "".join(traceback.format_exception(error))
  where = ""
  if workdir and not isinstance(error, rundir.RunError):
    try:
      path = f"{workdir}/error.log"
      with open(path, "a") as f:
        f.write(text)
      where = f" (traceback in {path})"
    except OSError:
      pass
  if FLAGS.verbose:
    sys.stderr.write(text)
  kind = "" if isinstance(error, rundir.RunError) else f"{type(error).__name__}: "
  message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  sys.stderr.write(f"error: {kind}{message}{where}\n")
  return 2 if isinstance(error, rundir.RunError) else 1


def main(argv, clip_kwargs=None):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax and JAX log every save and compile at INFO through absl: keep the
  # console for the progress bar and the summary.
  logging.set_verbosity(logging.INFO if FLAGS.verbose else logging.WARNING)
  config = FLAGS.config
  if clip_kwargs:
    with config.clip.kwargs.unlocked():
      config.clip.kwargs.update(clip_kwargs)
  try:
    if FLAGS.distributed:
      # CPU processes need a collectives backend (GPU/TPU have their own; ignored there).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    summary = train.train_and_evaluate(
        config, FLAGS.workdir, allow_changes=FLAGS.allow_config_change
    )
  except Exception as e:  # noqa: BLE001 - every failure ends as one clear line
    return _report(e, FLAGS.workdir)
  if jax.process_index() == 0:
    print(
        " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
    )
  return 0


def _config_path(argv: list[str]) -> str | None:
  """The file of --config=FILE[:ARG] (or --config FILE), if given."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config that fails to load or apply as one line.

  ml_collections raises plain exceptions (an override naming no field is an
  AttributeError) from inside the parsing, which absl would print as a
  traceback of some 60 lines.
  """
  path = _config_path(argv)
  if path is not None and not os.path.isfile(path):
    sys.stderr.write(f"error: --config: no such file: {path}\n")
    sys.exit(2)
  try:
    return FLAGS(argv)
  except flags.Error as e:  # a bad flag or value: absl's message, on one line
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    sys.stderr.write(f"error: {message} (--helpfull lists the flags)\n")
    sys.exit(2)
  except Exception as e:  # noqa: BLE001 - one clear line, as for every failure
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    what = f" (overrides: {', '.join(overrides)})" if overrides else ""
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    sys.stderr.write(
        f"error: the config could not be loaded or overridden{what}: "
        f"{type(e).__name__}: {message}\n"
    )
    sys.exit(2)


def run():
  argv, clip_kwargs = split_clip_kwargs(sys.argv)
  sys.argv[:] = argv  # ml_collections reads its overrides from sys.argv
  app.run(lambda a: main(a, clip_kwargs), argv=argv, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
