r"""Trains and evaluates MobileNetV1: `python run.py --config=configs/cifar.py --workdir=DIR`.

Rerunning with the same --workdir resumes from its latest checkpoint.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads the dataset.

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags

from mobilenet_jax import train  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None,
                                "Config file and preset, e.g. configs/cifar.py:quick.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax and tfds log every step of a save at INFO.
  if FLAGS.config.mode == "eval":
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)
  elif FLAGS.config.mode == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    raise app.UsageError(f"--config.mode={FLAGS.config.mode!r}: expected 'train' or 'eval'.")


if __name__ == "__main__":
  app.run(main)
