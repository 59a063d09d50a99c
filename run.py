r"""Trains and evaluates MobileNetV1: `python run.py --config=configs/cifar.py --workdir=DIR`.

Rerunning with the same --workdir resumes from its latest checkpoint.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads the dataset.

from absl import app, flags  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

import jax  # pylint: disable=g-import-not-at-top
from mobilenet_jax import metric_logging, multihost, train  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None,
                                "Config file and preset, e.g. configs/cifar.py:quick.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metric_logging.show_progress()
  config = FLAGS.config
  if config.mode not in ("train", "eval"):
    raise app.UsageError(f"--config.mode={config.mode!r}: expected 'train' or 'eval'.")
  multihost.initialize(config)
  try:
    multihost.check_same_config(config)
    if config.mode == "eval":
      train.evaluate_checkpoint(config, FLAGS.workdir)
    else:
      train.train_and_evaluate(config, FLAGS.workdir)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    multihost.exit_after_failure(e, os.path.join(FLAGS.workdir, "checkpoints"))


if __name__ == "__main__":
  app.run(main)
