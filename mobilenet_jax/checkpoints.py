"""Orbax checkpoints of the TrainState in `workdir/checkpoints`, with automatic resume."""
import os

import flax
import jax
import orbax.checkpoint as ocp

from mobilenet_jax import models, steps


class Checkpointer:
  """Saves host copies of the state; restores the latest one into a template state."""

  def __init__(self, workdir: str, keep: int):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, state) -> None:
    """`state` must be a host (unreplicated) TrainState."""
    step = int(state.step)
    if step not in self.manager.all_steps():
      self.manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))

  def restore(self, template):
    """The latest checkpoint into `template`'s structure, or `template` if there is none."""
    step = self.manager.latest_step()
    if step is None:
      return template
    target = flax.serialization.to_state_dict(template)
    try:
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    except (ValueError, KeyError) as e:
      raise ValueError(
          f"The checkpoint at step {step} in {self.directory} does not fit the configured model "
          "or optimizer: it was written with another config. Rerun with the config it was "
          "trained with (config.json beside it) or use a new --workdir.") from e
    return flax.serialization.from_state_dict(template, restored)

  def close(self):
    self.manager.close()


def restore_trained(workdir: str, config):
  """The latest TrainState of a trained workdir, for evaluation and inference (none: an error)."""
  checkpointer = Checkpointer(workdir, config.keep_checkpoints)
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}: train first with "
                              f"`python run.py --config=... --workdir={workdir}`.")
    # Inference-mode BatchNorm needs no pmap axis, and the optimizer's state structure does
    # not depend on the schedule's steps per epoch.
    template = steps.create_train_state(models.create_model(config.model),
                                        steps.create_optimizer(config, 1), jax.random.key(0),
                                        config.image_size)
    return checkpointer.restore(template)
  finally:
    checkpointer.close()
