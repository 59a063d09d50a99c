"""Damaged checkpoints: the newest readable one is used, the damaged ones are kept aside."""
import glob
import logging
import os

import jax
import numpy as np
import pytest

from conftest import restore_latest
from mobilenet_jax import checkpoints, train

pytestmark = pytest.mark.slow  # Trains, or launches processes: `-m 'not slow'` skips it.


def _truncate(step_dir):
  """Halves every array file of a checkpoint, as a full disk or a partial copy leaves them."""
  files = glob.glob(os.path.join(step_dir, "default", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one(
    mock_tfds, smoke_config, tmp_path, caplog):
  del mock_tfds
  damaged, interrupted = tmp_path / "damaged", tmp_path / "interrupted"
  smoke_config.num_epochs = 2
  train.train_and_evaluate(smoke_config, str(damaged))  # Checkpoints 4 and 8.
  _truncate(damaged / "checkpoints" / "8")
  smoke_config.num_epochs = 1
  train.train_and_evaluate(smoke_config, str(interrupted))  # Stopped at 4, as if 8 never was.
  smoke_config.num_epochs = 3
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(smoke_config, str(damaged))
  train.train_and_evaluate(smoke_config, str(interrupted))

  lines = [r.getMessage() for r in caplog.records
           if "damaged" in r.getMessage() and r.levelno >= logging.WARNING]
  assert lines[0].startswith(f"The checkpoint at step 8 in {damaged / 'checkpoints'} is damaged, "
                             "trying an older one: ValueError: OUT_OF_RANGE"), lines
  assert "\n" not in lines[0]
  assert any("Resuming from the checkpoint at step 4" in r.getMessage() for r in caplog.records)
  assert sorted(os.listdir(damaged / "checkpoints")) == ["12", "4", "8", "8.damaged"]
  a, b = restore_latest(damaged, smoke_config), restore_latest(interrupted, smoke_config)
  assert int(a.step) == int(b.step) == 12
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats)),
                  jax.tree.leaves((b.params, b.batch_stats))):
    np.testing.assert_array_equal(x, y)


def test_no_readable_checkpoint_is_one_clear_error_and_nothing_is_moved(
    mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  train.train_and_evaluate(smoke_config, str(tmp_path))
  for step in ("4", "8"):
    _truncate(tmp_path / "checkpoints" / step)
  with pytest.raises(checkpoints.DamagedCheckpointError,
                     match=f"No checkpoint in {tmp_path / 'checkpoints'} can be read "
                           r"\(steps 8, 4; .*restore them from a backup, or move them away"):
    restore_latest(tmp_path, smoke_config)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
