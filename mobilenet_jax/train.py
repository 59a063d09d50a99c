"""`train_and_evaluate(config, workdir)`: the whole training run, resumable at any step.

Everything a step needs is derived from `state.step` on device (the epoch's
permutation, the batch offset, the augmentation key), so a run that resumes
from a checkpoint continues exactly as if it had never stopped.
"""
import json
import math
import os
import signal
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from mobilenet_jax import checkpoints, inference, input_pipeline, metric_logging, models, parallel
from mobilenet_jax import steps
from mobilenet_jax import summary as summary_lib


def check_config(config, workdir: str) -> None:
  """Rejects a bad config or workdir with an actionable message, before any compilation."""
  def require(ok, message):
    if not ok:
      raise ValueError(message)
  require(config.learning_rate > 0, f"config.learning_rate={config.learning_rate}: must be > 0.")
  require(config.num_epochs > 0, f"config.num_epochs={config.num_epochs}: must be > 0.")
  require(0 <= config.momentum < 1, f"config.momentum={config.momentum}: must be in [0, 1).")
  require(config.weight_decay >= 0, f"config.weight_decay={config.weight_decay}: must be >= 0.")
  require(0 <= config.label_smoothing < 1,
          f"config.label_smoothing={config.label_smoothing}: must be in [0, 1).")
  require(0 <= config.eval_shift < config.image_size,
          f"config.eval_shift={config.eval_shift}: test-time translations need a number of "
          f"pixels in [0, image_size={config.image_size}); 0 turns them off.")
  require(config.parallel in parallel.PARALLEL_MODES,
          f"config.parallel={config.parallel!r}: expected one of {parallel.PARALLEL_MODES}.")
  bounds = list(config.lr_boundaries)
  require(len(bounds) == len(config.lr_decay),
          f"config.lr_boundaries={tuple(bounds)} and config.lr_decay={tuple(config.lr_decay)} "
          "need the same length (one decay factor per boundary).")
  require(bounds == sorted(bounds) and len(set(bounds)) == len(bounds) and
          all(0 < b for b in bounds),
          f"config.lr_boundaries={tuple(bounds)}: epochs must be positive and strictly increasing.")
  for name in ("eval_every_epochs", "checkpoint_every_epochs", "keep_checkpoints"):
    require(config[name] >= 1, f"config.{name}={config[name]}: must be >= 1.")
  require(config.init_from is None or
          os.path.exists(os.path.join(config.init_from, "config.json")),
          f"config.init_from={config.init_from}: no config.json there; pass a workdir that "
          "run.py trained or `python -m mobilenet_jax.convert` wrote.")
  input_pipeline.check_config(config, jax.device_count())
  steps.inference_chunk(config)
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: processes of a multi-host run share the workdir.
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ValueError(f"--workdir={workdir} is not writable ({e.strerror}): pass a folder "
                     "you can write to.") from e


class _StopRequested:
  """SIGTERM (preemption) as a flag that the loop checks after each step, then saves and exits.

  With several processes, JAX's preemption sync manager owns SIGTERM: any
  process's notice reaches all, and they agree on the step at which every one
  stops, so that all save the same checkpoint.
  """

  def __init__(self):
    self.requested = False
    self._multihost = jax.process_count() > 1
    if not self._multihost:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def check(self, step: int) -> bool:
    """Called once per step, after it: whether to stop now."""
    if self._multihost and not self.requested:
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def restore(self):
    if not self._multihost:
      signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; returns the final results dict.

  With several processes (`multihost`), every process runs this with the same
  config; only process 0 writes the workdir's files (checkpoints go through
  orbax, which coordinates the processes itself).
  """
  check_config(config, workdir)
  start = time.time()
  chief = jax.process_index() == 0

  data = _load(config)
  if len(data.train.labels) < config.batch_size:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the "
                     f"{len(data.train.labels)} training examples.")
  runner = parallel.create_runner(config, len(data.train.labels))
  model = models.create_model(config.model, axis_name=runner.axis_name)
  summary = summary_lib.summarize(models.create_model(config.model), config.image_size)
  if chief:
    print(summary.table(), flush=True)
  tx = steps.create_optimizer(config, runner.steps_per_epoch)
  lr_schedule = steps.learning_rate_schedule(config, runner.steps_per_epoch)

  checkpointer = checkpoints.Checkpointer(workdir, config.keep_checkpoints)
  state = checkpointer.restore(
      steps.create_train_state(model, tx, jax.random.key(config.seed), config.image_size))
  initial_step = int(state.step)
  if initial_step:
    logging.info("Resuming from the checkpoint at step %d.", initial_step)
  elif config.init_from:
    state = inference.start_from(state, config)
  if chief:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
    inference.save_label_names(workdir, data.label_names)
  logger = metric_logging.MetricLogger(workdir) if chief else None

  state = runner.put_state(state)
  train_data = runner.put_train_data(data.train)
  eval_data = runner.put_eval_data(data.test)
  spe = runner.steps_per_epoch
  total_steps = spe * config.num_epochs
  stop = _StopRequested()
  train_time, train_images, test = 0.0, 0, None
  try:
    step = initial_step
    while step < total_steps:
      epoch = step // spe
      perm = runner.shuffle(state)
      bar = tqdm.tqdm(total=spe, initial=step % spe, desc=f"epoch {epoch + 1}/{config.num_epochs}",
                      disable=not (chief and config.progress_bar), dynamic_ncols=True)
      epoch_metrics, t0, timed_from = [], time.time(), step
      with jax.transfer_guard_host_to_device("disallow"):
        while step < (epoch + 1) * spe and not stop.requested:
          state, metrics = runner.train(state, train_data, perm)
          epoch_metrics.append(metrics)
          step += 1
          if step == initial_step + 1:  # Exclude compilation from the throughput.
            jax.block_until_ready(metrics)
            t0, timed_from = time.time(), step
          bar.update(1)
          stop.check(step)
          if step % 50 == 0:
            loss = float(runner.metrics(metrics)["loss"]) / config.batch_size
            bar.set_postfix(loss=f"{loss:.3f}")
        sums = _sum(runner.metrics(epoch_metrics)) if epoch_metrics else {"loss": 0.0}
      bar.close()
      train_time += time.time() - t0
      train_images += (step - timed_from) * config.batch_size
      if not math.isfinite(sums["loss"]):
        raise FloatingPointError(
            f"The training loss became {sums['loss']} in epoch {epoch + 1} (step {step}). "
            f"Stopped; the last good checkpoint (step {checkpointer.latest_step()}) is kept in "
            f"{workdir}/checkpoints. Lower --config.learning_rate or check the data.")
      if stop.requested:
        checkpointer.save(runner.get_state(state))
        logging.warning("SIGTERM: saved the checkpoint at step %d; rerun to resume.", step)
        return {}
      finished = step == total_steps
      scalars = {"train_loss": sums["loss"] / sums["count"],
                 "train_accuracy": sums["correct"] / sums["count"],
                 "learning_rate": float(lr_schedule(step - 1)),
                 "train_images_per_s": train_images / max(train_time, 1e-9),
                 "epoch": epoch + 1}
      if finished or (epoch + 1) % config.eval_every_epochs == 0:
        test = _sum(runner.metrics(runner.evaluate(state, *eval_data)))
        scalars.update({k: v for k, v in _test_results(test).items() if k != "test_examples"})
      if logger:
        logger.write(step, scalars)
      if finished or (epoch + 1) % config.checkpoint_every_epochs == 0:
        checkpointer.save(runner.get_state(state))
  finally:
    stop.restore()
    checkpointer.close()
    if logger:
      logger.close()

  if test is None or config.eval_shift:
    # Resumed after the last epoch, or the final evaluation adds test-time translations
    # (too costly for every epoch's).
    test = _sum(runner.metrics(runner.evaluate(state, *eval_data, shift=config.eval_shift)))
  results = {**_test_results(test),
             "epochs": config.num_epochs,
             "params": summary.params,
             "macs": summary.macs,
             "train_images_per_s": train_images / train_time if train_time else None,
             "wall_s": time.time() - start}
  if chief:
    with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
    print(f"test accuracy {results['test_accuracy']:.4f} on {results['test_examples']} "
          f"examples (loss {results['test_loss']:.4f})", flush=True)
  return results


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Test metrics of the latest checkpoint in `workdir` (`--config.mode=eval`), without training."""
  check_config(config, workdir)
  state = checkpoints.restore_trained(workdir, config)
  data = _load(config)
  runner = parallel.create_runner(config, len(data.train.labels))
  test = _sum(runner.metrics(runner.evaluate(runner.put_state(state),
                                             *runner.put_eval_data(data.test),
                                             shift=config.eval_shift)))
  results = {**_test_results(test), "step": int(state.step)}
  print(f"step {results['step']}: test accuracy {results['test_accuracy']:.4f} on "
        f"{results['test_examples']} examples (loss {results['test_loss']:.4f})", flush=True)
  return results


def _load(config) -> input_pipeline.Dataset:
  data = input_pipeline.load(config)
  if data.num_classes != config.model.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes} but "
                     f"{config.dataset} has {data.num_classes} classes: pass "
                     f"--config.model.num_classes={data.num_classes}.")
  return data


def _test_results(sums) -> dict:
  return {"test_accuracy": sums["correct"] / sums["count"],
          "test_loss": sums["loss"] / sums["count"], "test_examples": int(sums["count"])}


def _sum(metrics) -> dict:
  """Adds up per-step (or per-batch) metric sums fetched from device."""
  if isinstance(metrics, dict):
    metrics = [metrics]
  return {k: float(np.sum([m[k] for m in metrics], dtype=np.float64)) for k in metrics[0]}
