r"""Trains and evaluates MobileNetV1: `python run.py --config=configs/cifar.py --workdir=DIR`.

Rerunning with the same --workdir resumes from its latest checkpoint. `--config.mode=eval`
evaluates the workdir's latest checkpoint with the config saved beside it (config.json), any
`--config.*` flags on top.
"""
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads the dataset.

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

import jax  # pylint: disable=g-import-not-at-top
# pylint: disable-next=g-import-not-at-top
from mobilenet_jax import arrays, checkpoints, folders, input_pipeline, metric_logging, multihost
from mobilenet_jax import train, workdirs  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None,
                                "Config file and preset, e.g. configs/cifar.py:quick.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that mean the command line or the workdir is wrong: one line, no traceback.
USER_ERRORS = (train.ConfigError, input_pipeline.DatasetUnavailableError,
               input_pipeline.UnknownSplitError, checkpoints.MismatchedCheckpointError,
               checkpoints.DamagedCheckpointError, folders.FolderError, arrays.ArraysError,
               FileNotFoundError)


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def parse_flags(argv):
  """absl's flag parsing, with a config file's errors (an unknown preset, a field typo, a value
  of the wrong type) as one line instead of ml_collections' chained tracebacks."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.keys()  # A config file that failed to load raises only when first read.
    return argv
  except OSError as e:
    _fail(f"--config: {str(e).strip().splitlines()[-1].strip()}")
  except (flags.Error, ValueError, AttributeError, KeyError, TypeError) as e:
    text = str(e).replace("\\n", "\n").replace("\\'", "'")
    typo = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', text)
    unknown = typo.group(2) if typo else re.fullmatch(r"""["' ]*(\w+)["' ]*""", text)
    if unknown:
      name = unknown if typo else unknown.group(1)
      flag = next((a.split("=")[0] for a in argv if re.match(
          rf"--config\.([\w.]*\.)?{name}(=|$)", a)), f"--config.{name}")
      hint = f"; did you mean {typo.group(1)!r}?" if typo else ""
      _fail(f"{flag}: no such field{hint} (every field is documented in configs/cifar.py)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = re.match(r"\w+Error: (.*)", lines[-1])  # A traceback's last line: the config's own.
    _fail(cause.group(1) if cause else lines[0])


def eval_config(workdir: str):
  """The workdir's saved config, with the command line's `--config.*` overrides on top."""
  config = workdirs.load_config(workdir)
  config.update_from_flattened_dict(config_flags.get_override_values(FLAGS["config"]))
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metric_logging.show_progress()
  config = FLAGS.config
  multihost.initialize(config)
  try:
    multihost.check_same_config(config)
    if config.mode == "eval":
      train.evaluate_checkpoint(eval_config(FLAGS.workdir), FLAGS.workdir)
    else:
      train.train_and_evaluate(config, FLAGS.workdir)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1:
      multihost.exit_after_failure(e, os.path.join(FLAGS.workdir, "checkpoints"))
    if isinstance(e, USER_ERRORS):
      _fail(str(e))
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
