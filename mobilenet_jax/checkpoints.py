"""Orbax checkpoints of the TrainState in a folder (`workdirs.checkpoint_dir`), with automatic
resume."""
import errno
import glob
import logging as std_logging
import os
import shutil
import sys

from absl import logging
from etils import epath
import flax
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from mobilenet_jax import errors, models, multihost, optimizers, steps


class MismatchedCheckpointError(errors.UserError, ValueError):
  """A readable checkpoint of another model or optimizer: the config is wrong, not the files."""


class DamagedCheckpointError(errors.UserError, RuntimeError):
  """A checkpoint's files cannot be read."""


class SaveError(errors.UserError, OSError):
  """A checkpoint could not be written (a full disk, a lost mount): the earlier ones stand."""


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in keys)


def _silence_abandoned_reads() -> None:
  """Drops the "Event loop is closed" errors of a failed restore's abandoned reads.

  When one array of a checkpoint cannot be read, orbax's restore fails at once
  and closes its event loop while tensorstore still reads the others; each of
  those then reports, from tensorstore's threads, that it found the loop closed
  (hundreds of tracebacks that say nothing about the checkpoint).
  """
  def hook(unraisable, previous=sys.unraisablehook):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  if getattr(sys.unraisablehook, "__name__", "") != hook.__name__:
    sys.unraisablehook = hook


class _HoldBackOrbaxErrors(std_logging.Filter):
  """Drops orbax's ERROR records: a failed save logs its error, with a traceback, once per
  writer thread (four times for one full disk); `Checkpointer.save` says it once instead."""

  def filter(self, record) -> bool:
    return not (record.levelno >= std_logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _stored(state) -> dict:
  """The state dict that a checkpoint holds: the TrainState's fields less those that are None
  (the weight average when `config.ema` is off), so that checkpoints written before that field
  existed and those written without it are the same files."""
  return {k: v for k, v in flax.serialization.to_state_dict(state).items() if v is not None}


def _disk_size(path: str) -> int:
  return sum(os.path.getsize(os.path.join(folder, name))
             for folder, _, names in os.walk(path) for name in names)


def _megabytes(n: int) -> str:
  return f"{n / 2**20:.1f} MB"


class Checkpointer:
  """Saves host copies of the state; restores the latest one into a template state.

  `writer`: the run that holds the workdir's lock, which alone may clean up the unfinished
  saves of a run that was killed (a reader must not: they may be a running save).
  """

  def __init__(self, directory: str, keep: int, writer: bool = False):
    self.directory = os.path.abspath(directory)
    _silence_abandoned_reads()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False,
                                             cleanup_tmp_directories=writer))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, state) -> None:
    """`state` must be a host (unreplicated) TrainState. A save that fails to write (a full
    disk) raises SaveError, which says what it needs; the earlier checkpoints stay as they are
    (orbax writes a temporary folder and renames it when complete)."""
    step = int(state.step)
    if step in self.manager.all_steps():
      return
    held_back = _HoldBackOrbaxErrors()
    std_logging.getLogger("absl").addFilter(held_back)
    try:
      self.manager.save(step, args=ocp.args.StandardSave(_stored(state)))
    except Exception as e:  # pylint: disable=broad-except
      if not (isinstance(e, OSError) or "os_error_code" in str(e)):
        raise
      raise SaveError(self._save_failure(step, state, e)) from e
    finally:
      std_logging.getLogger("absl").removeFilter(held_back)

  def _save_failure(self, step: int, state, error) -> str:
    """What failed, what a checkpoint needs, and what is kept. The partial save is removed now
    where it can be (one process; orbax's threads may still be writing into it), and by the
    next run's writer (`cleanup_tmp_directories`) in any case."""
    if jax.process_count() == 1:
      for partial in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(partial, ignore_errors=True)
    latest = self.manager.latest_step()
    needed = (_disk_size(os.path.join(self.directory, str(latest))) if latest is not None else
              sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)))
    reason = ("no space left on the device" if "No space left" in str(error) or
              getattr(error, "errno", None) == errno.ENOSPC else multihost.first_line(error))
    kept = (f"The checkpoints up to step {latest} are kept: free" if latest is not None else
            "No earlier checkpoint was saved: free")
    return (f"Could not save the checkpoint at step {step} in {self.directory}: {reason}. A "
            f"checkpoint takes about {_megabytes(needed)} there "
            f"({_megabytes(shutil.disk_usage(self.directory).free)} free). {kept} that much, "
            "then rerun the same command to resume.")

  def restore(self, template):
    """The newest readable checkpoint into `template`'s structure, or `template` if there is none.

    A checkpoint whose files cannot be read (truncated by a full disk or a partial
    copy, or missing) is logged, moved aside as `STEP.damaged` for inspection, and
    the next older one is tried. A readable checkpoint of another model or optimizer
    is an error, not damage: older ones were written with the same config.
    """
    target = _stored(template)
    damaged = {}
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self._restore(step, target)
      except DamagedCheckpointError as e:
        logging.warning("The checkpoint at step %d in %s is damaged, trying an older one: %s",
                        step, self.directory, e)
        damaged[step] = e
        continue
      self._agree_on(step)
      self._set_aside(damaged)
      return flax.serialization.from_state_dict(
          template, {**flax.serialization.to_state_dict(template), **restored})
    if damaged:
      raise DamagedCheckpointError(
          f"No checkpoint in {self.directory} can be read (steps "
          f"{', '.join(map(str, damaged))}; see the lines above for why): restore them from a "
          "backup, or move them away to train from scratch.")
    return template

  def _restore(self, step, target):
    """Step `step`'s state dict; `DamagedCheckpointError` if its files cannot be read."""
    try:
      stored = ocp.StandardCheckpointHandler().metadata(
          epath.Path(self.directory) / str(step) / "default").tree
      stored = {_path(k): tuple(m.shape) for k, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(multihost.first_line(e)) from e
    expected = {_path(k): tuple(jax.numpy.shape(v))
                for k, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    if stored != expected:
      differ = sorted(k for k in stored.keys() | expected.keys()
                      if stored.get(k) != expected.get(k))
      raise MismatchedCheckpointError(
          f"The checkpoint at step {step} in {self.directory} does not fit the configured model "
          f"or optimizer ({len(differ)} arrays differ, e.g. {differ[0]}: stored "
          f"{stored.get(differ[0])}, configured {expected.get(differ[0])}): it was written "
          "with another config. Rerun with the config it was trained with (config.json beside "
          "it) or use a new --workdir.")
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except
      raise DamagedCheckpointError(multihost.first_line(e)) from e

  @staticmethod
  def _agree_on(step):
    """Every process must resume from the same step, or their replicas would silently differ."""
    if jax.process_count() == 1:
      return
    steps_read = multihost_utils.process_allgather(np.int64(step))
    if len(set(np.ravel(steps_read).tolist())) != 1:
      raise DamagedCheckpointError(
          f"The processes restored different checkpoints (steps {np.ravel(steps_read).tolist()}): "
          "they do not see the same files. Give them one shared --workdir.")

  def _set_aside(self, damaged):
    """Process 0 renames the damaged checkpoints once every process has tried them."""
    if not damaged:
      return
    multihost_utils.sync_global_devices("mobilenet_jax: damaged checkpoints read")
    if jax.process_index() == 0:
      for step in damaged:
        source = os.path.join(self.directory, str(step))
        aside, n = f"{source}.damaged", 1
        while os.path.exists(aside):
          n += 1
          aside = f"{source}.damaged{n}"
        os.rename(source, aside)
        logging.warning("Moved the damaged checkpoint to %s.", aside)
    multihost_utils.sync_global_devices("mobilenet_jax: damaged checkpoints moved")
    self.manager.reload()

  def close(self):
    self.manager.close()


def state_template(config):
  """A TrainState of `config`'s structure, for checkpoints outside training: inference-mode
  BatchNorm needs no pmap axis, and the optimizer's state structure does not depend on the
  schedule's steps per epoch."""
  return steps.create_train_state(models.create_model(config.model),
                                  optimizers.create_optimizer(config, 1), jax.random.key(0),
                                  config.input.image_size, ema=config.ema.decay > 0)
