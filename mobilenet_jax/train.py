"""`train_and_evaluate(config, workdir)`: the whole training run, resumable at any step.

Everything a step needs is derived from `state.step` on device by the sampler
(the epoch's permutation, the batch offset, the augmentation draws), or for
streamed input on the host from the same step (`streaming.py`), so a run that
resumes from a checkpoint continues exactly as if it had never stopped.
"""
import contextlib
import dataclasses
import math
import signal
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from mobilenet_jax import checkpoints, config_lib, datasets, errors, inference, optimizers
from mobilenet_jax import metric_logging, models, parallel, plots, profiling, sampler, steps
from mobilenet_jax import streaming, workdirs
from mobilenet_jax import summary as summary_lib


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


@dataclasses.dataclass
class _Run:
  """What the phases of a run share: set up once, `state` and `step` advanced by each epoch."""
  config: Any
  workdir: str
  lock: Any  # workdirs.Lock: checked before each write.
  runner: Any  # parallel.JitRunner or parallel.PmapRunner
  summary: summary_lib.Summary
  checkpointer: checkpoints.Checkpointer
  logger: metric_logging.MetricLogger | None  # Process 0 only.
  state: Any
  step: int
  first_step: int  # Where this invocation started (0, or the resumed checkpoint's step).
  feed: Any  # parallel.DeviceFeed or streaming.StreamFeed: each step's data arguments.
  profiler: profiling.Profiler

  @property
  def steps_per_epoch(self) -> int:
    return self.runner.steps_per_epoch

  @property
  def total_steps(self) -> int:
    return self.steps_per_epoch * self.config.num_epochs


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; returns the final results dict.

  The run holds the workdir's lock (`workdirs.Lock`) from before its first write to the end:
  a second run on the same workdir stops at once. With several processes (`multihost`),
  every process runs this with the same config; process 0 holds the lock and alone writes
  the workdir's files (checkpoints go through orbax, which coordinates the processes itself).
  """
  config = config_lib.with_global_batch(config)
  config_lib.check_config(config, workdir)
  start = time.time()
  with workdirs.lock(workdir, config.distributed.timeout_s) as lock:
    run = _set_up(config, workdir, lock)
    throughput, stop, last_eval = profiling.Throughput(), _StopRequested(), None
    try:
      while run.step < run.total_steps:
        sums = _train_epoch(run, throughput, stop)
        if stop.requested:
          _save(run)
          logging.warning("SIGTERM: saved the checkpoint at step %d; rerun to resume.", run.step)
          return {}
        last_eval = _end_epoch(run, sums, throughput)
    finally:
      stop.restore()
      run.profiler.stop()
      run.feed.close()
      run.checkpointer.close()
      if run.logger:
        run.logger.close()
    return _final_results(run, last_eval, throughput, time.time() - start)


def _set_up(config, workdir: str, lock) -> _Run:
  """Data on the devices, the model's summary, and the state: resumed, `init_from`, or new."""
  chief = jax.process_index() == 0
  data, runner, feed = _load(config)
  summary = summary_lib.summarize(models.create_model(config.model), config.input.image_size)
  if chief:
    print(summary.table(), flush=True)
  checkpointer = checkpoints.Checkpointer(workdirs.checkpoint_dir(workdir),
                                         config.checkpoint.keep, writer=True)
  state = checkpointer.restore(steps.create_train_state(
      models.create_model(config.model, axis_name=runner.axis_name),
      optimizers.create_optimizer(config, runner.steps_per_epoch), sampler.init_key(config.seed),
      config.input.image_size, ema=config.ema.decay > 0))
  step = int(state.step)
  if step:
    logging.info("Resuming from the checkpoint at step %d.", step)
  elif config.init_from:
    state = workdirs.start_from(state, config)
  if chief:
    workdirs.write_config(workdir, config)
    workdirs.save_label_names(workdir, data.label_names)
    workdirs.trim_metrics(workdir, step)
  logger = metric_logging.MetricLogger(workdir) if chief else None
  return _Run(config, workdir, lock, runner, summary, checkpointer, logger,
              runner.put_state(state), step, step, feed, profiling.Profiler(config, workdir))


def _train_epoch(run: _Run, throughput: profiling.Throughput, stop: _StopRequested) -> dict:
  """The rest of the current epoch (all of it unless resumed mid-epoch, or stopped by SIGTERM),
  with the step cadences' logs and checkpoints; returns its summed training metrics."""
  config, runner = run.config, run.runner
  epoch = run.step // run.steps_per_epoch
  epoch_end = (epoch + 1) * run.steps_per_epoch
  bar = tqdm.tqdm(total=run.steps_per_epoch, initial=run.step % run.steps_per_epoch,
                  desc=f"epoch {epoch + 1}/{config.num_epochs}", dynamic_ncols=True,
                  disable=not (run.logger and config.log.progress_bar))
  metrics, logged = [], 0  # Each step's metrics; how many of them a step log has covered.
  throughput.start(run.step)
  with jax.transfer_guard_host_to_device("disallow"):
    with contextlib.closing(run.feed.train_steps(run.state, run.step, epoch_end)) as inputs:
      for args in inputs:
        run.profiler.before_step(run.step)
        run.state, step_metrics = runner.train(run.state, *args)
        metrics.append(step_metrics)
        run.step += 1
        run.profiler.after_step(run.step, step_metrics)
        if run.step == run.first_step + 1:  # Compiled: time from here.
          jax.block_until_ready(step_metrics)
          throughput.start(run.step)
        bar.update(1)
        if stop.check(run.step):
          break
        if run.step < epoch_end and _due(run.step, config.log.every_steps):
          _log_steps(run, _sum(runner.metrics(metrics[logged:])))
          logged = len(metrics)
        if run.step < epoch_end and _due(run.step, config.checkpoint.every_steps):
          _save(run)
        if run.step % 50 == 0:
          loss = float(runner.metrics(step_metrics)["loss"]) / config.input.batch_size
          bar.set_postfix(loss=f"{loss:.3f}")
    sums = _sum(runner.metrics(metrics)) if metrics else {"loss": 0.0}
  bar.close()
  throughput.stop(run.step, config.input.batch_size)
  return sums


def _save(run: _Run) -> None:
  run.lock.check()
  run.checkpointer.save(run.runner.get_state(run.state))


def _log(run: _Run, scalars: dict) -> None:
  run.lock.check()
  if run.logger:
    run.logger.write(run.step, scalars)


def _due(step: int, every: int | None) -> bool:
  return every is not None and step % every == 0


def _check_finite(run: _Run, loss: float) -> None:
  if not math.isfinite(loss):
    kept = run.checkpointer.latest_step()
    kept = ("no checkpoint was saved before it" if kept is None else
            f"the last good checkpoint (step {kept}) is kept in {run.checkpointer.directory}")
    raise FloatingPointError(
        f"The training loss became {loss} in epoch {-(-run.step // run.steps_per_epoch)} "
        f"(step {run.step}). Stopped; {kept}. Lower --config.schedule.learning_rate or check "
        "the data.")


def _train_scalars(run: _Run, sums: dict) -> dict:
  """Training loss, accuracy and the last step's rate, from summed metrics."""
  _check_finite(run, sums["loss"])
  return {"train_loss": sums["loss"] / sums["count"],
          "train_accuracy": sums["correct"] / sums["count"],
          "learning_rate": float(optimizers.learning_rate_schedule(
              run.config, run.steps_per_epoch)(run.step - 1))}


def _log_steps(run: _Run, sums: dict) -> None:
  """config.log.every_steps: the steps since the last log (an epoch's last step logs as the
  epoch, in `_end_epoch`)."""
  with jax.transfer_guard_host_to_device("allow"):  # The rate: the schedule at the step.
    scalars = _train_scalars(run, sums)
  _log(run, scalars)


def _end_epoch(run: _Run, sums: dict, throughput: profiling.Throughput):
  """Logs the epoch, evaluates and checkpoints when due; returns the evaluation's sums, if any."""
  config, runner, epoch = run.config, run.runner, run.step // run.steps_per_epoch
  finished = run.step == run.total_steps
  images_per_s = throughput.images / max(throughput.seconds, 1e-9)
  scalars = {**_train_scalars(run, sums), "train_images_per_s": images_per_s,
             "train_gflop_per_s": profiling.gflop_per_s(run.summary.macs, images_per_s),
             "epoch": epoch}
  evaluation = None
  if finished or epoch % config.eval.every_epochs == 0:
    evaluation = _evaluate(runner, run.feed, run.state, inference.Views.of(config, shift=False))
    scalars.update({k: v for k, v in _test_results(evaluation, per_class=False).items()
                    if k != "test_examples"})
  _log(run, scalars)
  if (finished or epoch % config.checkpoint.every_epochs == 0 or
      _due(run.step, config.checkpoint.every_steps)):
    _save(run)
  return evaluation if finished else None


def _final_results(run: _Run, last_eval, throughput: profiling.Throughput, wall_s: float) -> dict:
  """The final evaluation (the last epoch's, unless resumed after it or test-time translations
  are on: too costly for every epoch's), written to results.json."""
  config = run.config
  if last_eval is None or config.eval.shift:
    last_eval = _evaluate(run.runner, run.feed, run.state, inference.Views.of(config))
  results = {**_test_results(last_eval), "epochs": config.num_epochs,
             "params": run.summary.params, "macs": run.summary.macs,
             "train_images_per_s": throughput.images_per_s,
             "train_gflop_per_s": profiling.gflop_per_s(run.summary.macs,
                                                        throughput.images_per_s),
             "wall_s": wall_s}
  run.lock.check()
  if run.logger:
    workdirs.write_results(run.workdir, results)
    _print_results(results)
    for path in (plots.curves(run.workdir), plots.confusion(run.workdir)):
      logging.info("Wrote %s.", path)
  return results


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Test metrics of the latest checkpoint in `workdir` (`--config.mode=eval`), without training."""
  config = config_lib.with_global_batch(config)
  config_lib.check_config(config, workdir)
  state = workdirs.restore_trained(workdir, config)
  data, runner, feed = _load(config)
  try:
    test = _evaluate(runner, feed, runner.put_state(state), inference.Views.of(config))
  finally:
    feed.close()
  results = {**_test_results(test), "step": int(state.step)}
  _print_results(results, f"step {results['step']}: ")
  print(per_class_table(results, data.label_names), flush=True)
  return results


def per_class_table(results: dict, label_names) -> str:
  """Each class's accuracy, example count and the class it is most often mistaken for, from
  the confusion matrix of the weight average when kept (as predict uses it), else the weights'."""
  prefix = "ema_" if "ema_test_confusion" in results else ""
  confusion = np.asarray(results[f"{prefix}test_confusion"])
  mistaken = confusion - np.diag(np.diag(confusion))
  width = max(len("class"), *map(len, label_names))
  lines = [f"{'class':<{width}}  accuracy  examples  most often mistaken for "
           f"({'weight average' if prefix else 'weights'})"]
  for i, name in enumerate(label_names):
    examples = int(confusion[i].sum())
    other = int(np.argmax(mistaken[i]))
    worst = (f"{label_names[other]} ({mistaken[i, other] / examples:.1%})"
             if mistaken[i, other] else "-")
    accuracy = f"{confusion[i, i] / examples:8.2%}" if examples else f"{'-':>8}"
    lines.append(f"{name:<{width}}  {accuracy}  {examples:8d}  {worst}")
  return "\n".join(lines)


def _print_results(results: dict, prefix: str = "") -> None:
  """The test metrics in a line, and the weight average's in another when kept."""
  for weights, name in (("", ""), ("ema_", "weight average (config.ema): ")):
    if f"{weights}test_accuracy" in results:
      print(f"{prefix}{name}test accuracy {results[f'{weights}test_accuracy']:.4f} (top-5 "
            f"{results[f'{weights}test_top5_accuracy']:.4f}) on {results['test_examples']} "
            f"examples (loss {results[f'{weights}test_loss']:.4f})", flush=True)


def _evaluate(runner, feed, state, views) -> dict:
  """The evaluation's metric sums for the weights (key '') and, when kept, for their average
  ('ema_'), on the test-time `views`."""
  weights = {"": state} if state.ema is None else {"": state, "ema_": steps.averaged(state)}
  return {prefix: _sum(runner.metrics(feed.evaluate(w, views))) for prefix, w in weights.items()}


def _load(config):
  """The dataset, the runner for it and its feed (on device, or streamed from the host)."""
  data, mode = datasets.load(config)
  if data.num_classes != config.model.num_classes:
    raise errors.ConfigError(
        f"config.model.num_classes={config.model.num_classes} but "
        f"{config.data.name} has {data.num_classes} classes: pass "
        f"--config.model.num_classes={data.num_classes}.")
  if len(data.train) < config.input.batch_size:
    raise errors.ConfigError(
        f"config.input.batch_size={config.input.batch_size} exceeds the "
        f"{len(data.train)} training examples.")
  runner = parallel.create_runner(config, len(data.train), streamed=mode == "stream")
  if mode == "stream":
    return data, runner, streaming.StreamFeed(config, runner, data.train, data.test)
  return data, runner, parallel.DeviceFeed(runner, data)


def _test_results(evaluation: dict, per_class: bool = True) -> dict:
  """An evaluation's (`_evaluate`) results, those of the weight average prefixed 'ema_';
  `per_class`: with each class's accuracy and the confusion matrix (rows: the true class,
  columns: the predicted one)."""
  results = {}
  for prefix, sums in evaluation.items():
    count = sums["count"]
    results.update({f"{prefix}test_accuracy": sums["correct"] / count,
                    f"{prefix}test_top5_accuracy": sums["correct_top5"] / count,
                    f"{prefix}test_loss": sums["loss"] / count})
    if per_class:
      confusion = np.asarray(sums["confusion"])
      results[f"{prefix}test_per_class_accuracy"] = (np.diag(confusion) /
                                                     np.maximum(confusion.sum(1), 1)).tolist()
      results[f"{prefix}test_confusion"] = confusion.astype(int).tolist()
  return {**results, "test_examples": int(evaluation[""]["count"])}


def _sum(metrics) -> dict:
  """Adds up per-step (or per-batch) metric sums fetched from device: scalars become floats."""
  if isinstance(metrics, dict):
    metrics = [metrics]
  sums = {k: np.sum([m[k] for m in metrics], axis=0, dtype=np.float64) for k in metrics[0]}
  return {k: float(v) if v.ndim == 0 else v for k, v in sums.items()}
