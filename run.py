r"""Trains and evaluates MobileNetV1: `python run.py --config=configs/cifar.py --workdir=DIR`.

Rerunning with the same --workdir resumes from its latest checkpoint. `--config.mode=eval`
evaluates the workdir's latest checkpoint with the config saved beside it (config.json), any
`--config.*` flags on top.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only reads the dataset.

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top

# pylint: disable-next=g-import-not-at-top
from mobilenet_jax import config_lib, errors, metric_logging, multihost, train, workdirs

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file and preset, e.g. configs/cifar.py:quick; "
                    "--config.FIELD=VALUE overrides a field.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.mark_flags_as_required(["config", "workdir"])


def eval_config(workdir: str):
  """The workdir's saved config, with the command line's `--config.*` overrides on top."""
  return config_lib.override(workdirs.load_config(workdir),
                             config_lib.command_line_overrides())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  metric_logging.show_progress()
  try:
    config = config_lib.from_flags()
  except errors.UserError as e:
    config_lib.fail(e)
  multihost.initialize(config)
  try:
    multihost.check_same_config(config)
    if config.mode == "eval":
      train.evaluate_checkpoint(eval_config(FLAGS.workdir), FLAGS.workdir)
    else:
      train.train_and_evaluate(config, FLAGS.workdir)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() > 1:
      multihost.exit_after_failure(e, workdirs.checkpoint_dir(FLAGS.workdir))
    if isinstance(e, (errors.UserError, FileNotFoundError)):
      config_lib.fail(e)
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
