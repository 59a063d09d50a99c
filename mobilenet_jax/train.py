"""`train_and_evaluate(config, workdir)`: the whole training run, resumable at any step.

Everything a step needs is derived from `state.step` on device by the sampler
(the epoch's permutation, the batch offset, the augmentation draws), or for
streamed input on the host from the same step (`streaming.py`), so a run that
resumes from a checkpoint continues exactly as if it had never stopped.
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from mobilenet_jax import checkpoints, datasets, inference, input_pipeline
from mobilenet_jax import metric_logging, models, parallel, steps, streaming, workdirs
from mobilenet_jax import summary as summary_lib


class ConfigError(ValueError):
  """A bad setting or workdir: run.py prints its message as one line, without a traceback."""


def check_config(config, workdir: str) -> None:
  """Rejects a bad config or workdir with an actionable message, before any data is read.

  The one place every setting is checked: each module's own `check_config`, then the
  run's (schedule, evaluation cadence, init_from, workdir)."""
  try:
    _check_config(config, workdir)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def with_global_batch(config):
  """`config`, with batch_size set from per_process_batch_size (if set) and the process count."""
  if config.per_process_batch_size is None:
    return config
  if config.per_process_batch_size <= 0:
    raise ConfigError(f"config.per_process_batch_size={config.per_process_batch_size}: must be "
                      "> 0 (or None, to use config.batch_size as the global batch).")
  config = config.copy_and_resolve_references()
  config.batch_size = config.per_process_batch_size * jax.process_count()
  return config


def _check_config(config, workdir: str) -> None:
  def require(ok, message):
    if not ok:
      raise ValueError(message)
  require(config.learning_rate > 0, f"config.learning_rate={config.learning_rate}: must be > 0.")
  require(config.num_epochs > 0, f"config.num_epochs={config.num_epochs}: must be > 0.")
  require(0 <= config.momentum < 1, f"config.momentum={config.momentum}: must be in [0, 1).")
  require(config.weight_decay >= 0, f"config.weight_decay={config.weight_decay}: must be >= 0.")
  require(0 <= config.label_smoothing < 1,
          f"config.label_smoothing={config.label_smoothing}: must be in [0, 1).")
  require(config.mode in ("train", "eval"),
          f"config.mode={config.mode!r}: expected 'train' or 'eval'.")
  require(config.batch_size > 0, f"config.batch_size={config.batch_size}: must be > 0.")
  require(config.lr_batch is None or config.lr_batch > 0,
          f"config.lr_batch={config.lr_batch}: must be > 0 (or None: rates as written).")
  require(config.parallel in parallel.PARALLEL_MODES,
          f"config.parallel={config.parallel!r}: expected one of {parallel.PARALLEL_MODES}.")
  bounds = list(config.lr_boundaries)
  require(len(bounds) == len(config.lr_values) and min(config.lr_values, default=1) > 0,
          f"config.lr_boundaries={tuple(bounds)} and config.lr_values={tuple(config.lr_values)} "
          "need the same length (the rate from each boundary on), and positive rates.")
  require(bounds == sorted(bounds) and len(set(bounds)) == len(bounds) and
          all(0 < b for b in bounds),
          f"config.lr_boundaries={tuple(bounds)}: epochs must be positive and strictly increasing.")
  for name in ("eval_every_epochs", "checkpoint_every_epochs", "keep_checkpoints"):
    require(config[name] >= 1, f"config.{name}={config[name]}: must be >= 1.")
  require(config.init_from is None or
          os.path.exists(os.path.join(config.init_from, "config.json")),
          f"config.init_from={config.init_from}: no config.json there; pass a workdir that "
          "run.py trained or `python -m mobilenet_jax.convert` wrote.")
  models.check_config(config.model)
  input_pipeline.check_config(config, jax.device_count())
  datasets.check_config(config)
  inference.check_config(config)
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


@dataclasses.dataclass
class _Run:
  """What the phases of a run share: set up once, `state` and `step` advanced by each epoch."""
  config: Any
  workdir: str
  runner: Any  # parallel.JitRunner or parallel.PmapRunner
  summary: summary_lib.Summary
  checkpointer: checkpoints.Checkpointer
  logger: metric_logging.MetricLogger | None  # Process 0 only.
  state: Any
  step: int
  first_step: int  # Where this invocation started (0, or the resumed checkpoint's step).
  feed: Any  # parallel.DeviceFeed or streaming.StreamFeed: each step's data arguments.

  @property
  def steps_per_epoch(self) -> int:
    return self.runner.steps_per_epoch

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.config.num_epochs


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; returns the final results dict.

  With several processes (`multihost`), every process runs this with the same
  config; only process 0 writes the workdir's files (checkpoints go through
  orbax, which coordinates the processes itself).
  """
  config = with_global_batch(config)
  check_config(config, workdir)
  start = time.time()
  run = _set_up(config, workdir)
  throughput, stop, last_eval = Throughput(), _StopRequested(), None
  try:
    while run.step < run.total_steps:
      sums = _train_epoch(run, throughput, stop)
      if stop.requested:
        run.checkpointer.save(run.runner.get_state(run.state))
        logging.warning("SIGTERM: saved the checkpoint at step %d; rerun to resume.", run.step)
        return {}
      last_eval = _end_epoch(run, sums, throughput)
  finally:
    stop.restore()
    run.feed.close()
    run.checkpointer.close()
    if run.logger:
      run.logger.close()
  return _final_results(run, last_eval, throughput, time.time() - start)


def _set_up(config, workdir: str) -> _Run:
  """Data on the devices, the model's summary, and the state: resumed, `init_from`, or new."""
  chief = jax.process_index() == 0
  data, runner, feed = _load(config)
  summary = summary_lib.summarize(models.create_model(config.model), config.image_size)
  if chief:
    print(summary.table(), flush=True)
  checkpointer = checkpoints.Checkpointer(workdir, config.keep_checkpoints)
  state = checkpointer.restore(steps.create_train_state(
      models.create_model(config.model, axis_name=runner.axis_name),
      steps.create_optimizer(config, runner.steps_per_epoch), jax.random.key(config.seed),
      config.image_size))
  step = int(state.step)
  if step:
    logging.info("Resuming from the checkpoint at step %d.", step)
  elif config.init_from:
    state = workdirs.start_from(state, config)
  if chief:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
    workdirs.save_label_names(workdir, data.label_names)
  return _Run(config, workdir, runner, summary, checkpointer,
              metric_logging.MetricLogger(workdir) if chief else None, runner.put_state(state),
              step, step, feed)


def _train_epoch(run: _Run, throughput: Throughput, stop: _StopRequested) -> dict:
  """The rest of the current epoch (all of it unless resumed mid-epoch, or stopped by SIGTERM);
  returns its summed training metrics."""
  config, runner = run.config, run.runner
  epoch = run.step // run.steps_per_epoch
  epoch_end = (epoch + 1) * run.steps_per_epoch
  bar = tqdm.tqdm(total=run.steps_per_epoch, initial=run.step % run.steps_per_epoch,
                  desc=f"epoch {epoch + 1}/{config.num_epochs}", dynamic_ncols=True,
                  disable=not (run.logger and config.progress_bar))
  metrics = []
  throughput.start(run.step)
  with jax.transfer_guard_host_to_device("disallow"):
    with contextlib.closing(run.feed.train_steps(run.state, run.step, epoch_end)) as inputs:
      for args in inputs:
        run.state, step_metrics = runner.train(run.state, *args)
        metrics.append(step_metrics)
        run.step += 1
        if run.step == run.first_step + 1:  # Compiled: time from here.
          jax.block_until_ready(step_metrics)
          throughput.start(run.step)
        bar.update(1)
        if stop.check(run.step):
          break
        if run.step % 50 == 0:
          loss = float(runner.metrics(step_metrics)["loss"]) / config.batch_size
          bar.set_postfix(loss=f"{loss:.3f}")
    sums = _sum(runner.metrics(metrics)) if metrics else {"loss": 0.0}
  bar.close()
  throughput.stop(run.step, config.batch_size)
  return sums


def _end_epoch(run: _Run, sums: dict, throughput: Throughput):
  """Logs the epoch, evaluates and checkpoints when due; returns the evaluation's sums, if any."""
  config, runner, epoch = run.config, run.runner, run.step // run.steps_per_epoch
  if not math.isfinite(sums["loss"]):
    raise FloatingPointError(
        f"The training loss became {sums['loss']} in epoch {epoch} (step {run.step}). Stopped; "
        f"the last good checkpoint (step {run.checkpointer.latest_step()}) is kept in "
        f"{run.workdir}/checkpoints. Lower --config.learning_rate or check the data.")
  finished = run.step == run.total_steps
  scalars = {"train_loss": sums["loss"] / sums["count"],
             "train_accuracy": sums["correct"] / sums["count"],
             "learning_rate": float(steps.learning_rate_schedule(
                 config, run.steps_per_epoch)(run.step - 1)),
             "train_images_per_s": throughput.images / max(throughput.seconds, 1e-9),
             "epoch": epoch}
  evaluation = None
  if finished or epoch % config.eval_every_epochs == 0:
    evaluation = _sum(runner.metrics(run.feed.evaluate(run.state,
                                                       inference.Views.of(config, shift=False))))
    scalars.update({k: v for k, v in _test_results(evaluation).items() if k != "test_examples"})
  if run.logger:
    run.logger.write(run.step, scalars)
  if finished or epoch % config.checkpoint_every_epochs == 0:
    run.checkpointer.save(runner.get_state(run.state))
  return evaluation if finished else None


def _final_results(run: _Run, last_eval, throughput: Throughput, wall_s: float) -> dict:
  """The final evaluation (the last epoch's, unless resumed after it or test-time translations
  are on: too costly for every epoch's), written to results.json."""
  config = run.config
  if last_eval is None or config.eval_shift:
    last_eval = _sum(run.runner.metrics(run.feed.evaluate(run.state, inference.Views.of(config))))
  results = {**_test_results(last_eval), "epochs": config.num_epochs,
             "params": run.summary.params, "macs": run.summary.macs,
             "train_images_per_s": throughput.images_per_s, "wall_s": wall_s}
  if run.logger:
    with open(os.path.join(run.workdir, "results.json"), "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)
    print(f"test accuracy {results['test_accuracy']:.4f} on {results['test_examples']} "
          f"examples (loss {results['test_loss']:.4f})", flush=True)
  return results


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Test metrics of the latest checkpoint in `workdir` (`--config.mode=eval`), without training."""
  config = with_global_batch(config)
  check_config(config, workdir)
  state = checkpoints.restore_trained(workdir, config)
  _, runner, feed = _load(config)
  try:
    test = _sum(runner.metrics(feed.evaluate(runner.put_state(state), inference.Views.of(config))))
  finally:
    feed.close()
  results = {**_test_results(test), "step": int(state.step)}
  print(f"step {results['step']}: test accuracy {results['test_accuracy']:.4f} on "
        f"{results['test_examples']} examples (loss {results['test_loss']:.4f})", flush=True)
  return results


def _load(config):
  """The dataset, the runner for it and its feed (on device, or streamed from the host)."""
  data, mode = datasets.load(config)
  if data.num_classes != config.model.num_classes:
    raise ConfigError(f"config.model.num_classes={config.model.num_classes} but "
                      f"{config.dataset} has {data.num_classes} classes: pass "
                      f"--config.model.num_classes={data.num_classes}.")
  if len(data.train) < config.batch_size:
    raise ConfigError(f"config.batch_size={config.batch_size} exceeds the "
                      f"{len(data.train)} training examples.")
  try:
    runner = parallel.create_runner(config, len(data.train), streamed=mode == "stream")
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if mode == "stream":
    return data, runner, streaming.StreamFeed(config, runner, data.train, data.test)
  return data, runner, parallel.DeviceFeed(runner, data)


def _test_results(sums) -> dict:
  return {"test_accuracy": sums["correct"] / sums["count"],
          "test_loss": sums["loss"] / sums["count"], "test_examples": int(sums["count"])}


def _sum(metrics) -> dict:
  """Adds up per-step (or per-batch) metric sums fetched from device."""
  if isinstance(metrics, dict):
    metrics = [metrics]
  return {k: float(np.sum([m[k] for m in metrics], dtype=np.float64)) for k in metrics[0]}
