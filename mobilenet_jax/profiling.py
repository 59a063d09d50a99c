"""How fast a run trains: images/s and GFLOP/s per epoch and overall, and a `jax.profiler` trace
of the steps `config.log.profile_steps` names, for TensorBoard's profile tab.
"""
import os
import time

from absl import logging
import jax

from mobilenet_jax import errors

# A training image costs its forward pass (MACs x 2 FLOPs) and a backward pass of about twice
# that: the customary 3x (Kaplan et al., 2020), so MACs x 2 x 3.
TRAIN_FLOPS_PER_MAC = 6


def check_config(config) -> None:
  steps = config.log.profile_steps
  if steps is not None and not (len(steps) == 2 and 0 <= steps[0] < steps[1]):
    raise errors.ConfigError(
        f"config.log.profile_steps={steps}: expected (first, end) steps with 0 <= first < end, "
        "e.g. (10, 20), or None for no trace.")


def gflop_per_s(macs: int, images_per_s: float | None) -> float | None:
  """The training GFLOP/s achieved at `images_per_s` by a model of `macs` per image."""
  return None if images_per_s is None else macs * TRAIN_FLOPS_PER_MAC * images_per_s / 1e9


class Throughput:
  """Training images per second, over the timed steps: each epoch's first step after a
  (re)start includes compilation, so timing starts after it."""

  def __init__(self):
    self.seconds, self.images = 0.0, 0
    self._start = self._from_step = None

  def start(self, step: int) -> None:
    self._start, self._from_step = time.time(), step

  def stop(self, step: int, batch_size: int) -> None:
    self.seconds += time.time() - self._start
    self.images += (step - self._from_step) * batch_size

  @property
  def images_per_s(self):
    return self.images / self.seconds if self.seconds else None


class Profiler:
  """Traces steps [first, end) of `config.log.profile_steps` into WORKDIR/plugins/profile/, where
  TensorBoard's profile plugin (`pip install tensorboard-plugin-profile`) lists it as a run.

  Process 0 traces its own devices; a run resumed past `first` traces nothing. `after_step` is
  called after each step is dispatched, so the trace starts before step `first` is dispatched
  and stops once step `end - 1` has finished.
  """

  def __init__(self, config, workdir: str):
    steps = config.log.profile_steps if jax.process_index() == 0 else None
    self._first, self._end = steps or (None, None)
    self._workdir, self.tracing = workdir, False

  def before_step(self, step: int) -> None:
    if step == self._first:
      jax.profiler.start_trace(self._workdir)
      self.tracing = True

  def after_step(self, step: int, outputs) -> None:
    if self.tracing and step >= self._end:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    """Ends the trace (at `end`, or earlier when training stops), once `outputs` are ready."""
    if self.tracing:
      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.tracing = False
      logging.info("Wrote the profile of steps from %d to %s.", self._first,
                   os.path.join(self._workdir, "plugins", "profile"))
