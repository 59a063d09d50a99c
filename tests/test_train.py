"""The training run: determinism and the seed, resume, cadences, config errors, run.py end to
end, and the faults of a shared cluster (a busy workdir, a killed run's lock, a full disk)."""
import errno
import json
import os
import re
import shutil
import signal
import socket
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from conftest import (EVERY_AUGMENTATION, SHARED_TFDS, TRAINED_OVERRIDES, assert_same_state,
                      fresh_state, latest_step, restore_latest, run_mocked, smoke_args,
                      start_mocked, trained_args)
from mobilenet_jax import arrays, checkpoints, config_lib, input_pipeline, metric_logging, steps
from mobilenet_jax import train, workdirs

TIMING = ("wall_s", "train_images_per_s", "train_gflop_per_s")  # Two equal runs may differ.


@pytest.fixture
def trained_config(smoke_config):
  """The config of the shared `trained_workdir`'s run, for the tests that compare with it."""
  smoke_config.update_from_flattened_dict(TRAINED_OVERRIDES)
  return smoke_config


def _untimed(record: dict) -> dict:
  return {k: v for k, v in record.items() if k not in TIMING}


def _assert_same_run(workdir, reference, config):
  """`workdir` holds what `reference` holds: the final state, config, every metrics row (once)
  and the results, timing aside."""
  assert_same_state(restore_latest(workdir, config), restore_latest(reference, config))
  read = lambda folder, name: (folder / name).read_text()
  assert read(workdir, "config.json") == read(reference, "config.json")
  rows = lambda folder: [_untimed(json.loads(line)) for line in
                         read(folder, "metrics.jsonl").splitlines()]
  assert rows(workdir) == rows(reference)
  assert (_untimed(json.loads(read(workdir, "results.json"))) ==
          _untimed(json.loads(read(reference, "results.json"))))


def _wait_for(path, proc, timeout=300):
  deadline = time.time() + timeout
  while not path.exists():
    assert proc.poll() is None and time.time() < deadline, f"no {path}; exit code {proc.poll()}"
    time.sleep(0.05)


@pytest.mark.slow
def test_final_evaluation_adds_the_translations_and_per_epoch_ones_do_not(
    mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.update_from_flattened_dict({"num_epochs": 1, "eval.flip": True, "eval.shift": 2,
                                           "schedule.learning_rate": 0.1})
  # BatchNorm statistics that move in 4 steps, and a rate that moves the weights (Keras' decay
  # 0.99 and 0.01 leave the logits so near uniform that the views hardly differ).
  smoke_config.model.bn_momentum = 0.9
  results = train.train_and_evaluate(smoke_config, str(tmp_path))
  per_epoch = metric_logging.read_metrics(str(tmp_path))[-1]
  final = train.evaluate_checkpoint(smoke_config, str(tmp_path))
  assert final["test_loss"] == pytest.approx(results["test_loss"], rel=1e-6)
  assert final["test_accuracy"] == results["test_accuracy"] and results["test_examples"] == 40
  smoke_config.eval.shift = 0
  unshifted = train.evaluate_checkpoint(smoke_config, str(tmp_path))
  assert unshifted["test_loss"] == pytest.approx(per_epoch["test_loss"], rel=1e-6)
  # The views must change the loss by far more than the 1e-6 the equalities above allow.
  assert abs(unshifted["test_loss"] - results["test_loss"]) > 1e-4 * results["test_loss"], (
      unshifted["test_loss"], results["test_loss"])


@pytest.mark.parametrize("field,value,match", [
    ("schedule.learning_rate", -0.1, "config.schedule.learning_rate=-0.1"),
    ("parallel", "vmap", "config.parallel='vmap'"),
    ("schedule.boundaries", (20, 10), "strictly increasing"),
    ("schedule.rates", (0.1,), "same length"),
    ("schedule.rates", (0.1, 0.0), "positive rates"),
    ("augment.label_smoothing", 1.0, "config.augment.label_smoothing=1.0"),
    ("eval.chunk", -1, "config.eval.chunk=-1"),
    ("eval.shift", -1, "config.eval.shift=-1"),
    ("eval.shift", 16, "in \\[0, image_size=16\\)")])
def test_bad_config_is_rejected_before_training(smoke_config, tmp_path, field, value, match):
  smoke_config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=match):
    config_lib.check_config(smoke_config, str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_workdir_is_rejected(smoke_config, tmp_path):
  tmp_path.chmod(0o500)
  with pytest.raises(ValueError, match="--workdir=.* is not writable"):
    config_lib.check_config(smoke_config, str(tmp_path / "run"))


def test_workdir_that_is_a_file_is_rejected(smoke_config, tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="is not writable"):
    config_lib.check_config(smoke_config, str(tmp_path / "file"))


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run_and_another_seed_another(
    mock_tfds, smoke_config, tmp_path, monkeypatch):
  del mock_tfds
  init_keys, create = [], steps.create_train_state
  def create_train_state(model, tx, rng, image_size, **kwargs):
    init_keys.append(np.asarray(jax.random.key_data(rng)))
    return create(model, tx, rng, image_size, **kwargs)
  monkeypatch.setattr(steps, "create_train_state", create_train_state)
  smoke_config.num_epochs = 1
  runs = {}
  for name, seed in (("a", 0), ("b", 0), ("reseeded", 1)):
    smoke_config.seed = seed
    results = train.train_and_evaluate(smoke_config, str(tmp_path / name))
    # The seed initializes the weights (and, tests/test_sampler.py, orders and augments).
    np.testing.assert_array_equal(init_keys[-1], jax.random.key_data(jax.random.key(seed)))
    runs[name] = (results, restore_latest(tmp_path / name, smoke_config))
  assert_same_state(runs["a"][1], runs["b"][1])
  assert int(runs["a"][1].step) == 4 and runs["a"][0]["test_loss"] == runs["b"][0]["test_loss"]
  # Another seed: another initialization, order and augmentation, so other weights throughout.
  for x, y in zip(jax.tree.leaves(runs["a"][1].params), jax.tree.leaves(runs["reseeded"][1].params)):
    assert not np.array_equal(x, y)


@pytest.mark.slow
def test_a_dataset_of_variable_size_images_without_a_test_split_trains(
    mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.update_from_flattened_dict({"data.name": "tf_flowers",
                                           "data.train_split": "train[:90%]",
                                           "data.eval_split": "train[90%:]", "num_epochs": 1})
  smoke_config.model.num_classes = 5
  results = train.train_and_evaluate(smoke_config, str(tmp_path))
  assert results["test_examples"] == 40 and np.isfinite(results["test_loss"])
  with open(tmp_path / "label_names.json", encoding="utf-8") as f:
    assert len(json.load(f)) == 5


@pytest.mark.slow
def test_resumes_at_every_cadence_equal_a_straight_run_and_prune_old_checkpoints(
    mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  smoke_config.update_from_flattened_dict({**EVERY_AUGMENTATION,
                                           "eval.every_epochs": 2, "checkpoint.every_epochs": 2,
                                           "checkpoint.keep": 1, "ema.decay": 0.9,
                                           "ema.num_updates": True, "optim.micro_batches": 2})
  smoke_config.num_epochs = 4
  expected = train.train_and_evaluate(smoke_config, str(straight))
  for epochs in (1, 3, 4, 4):  # Each stop saves its last step; the last run finds it finished.
    smoke_config.num_epochs = epochs
    results = train.train_and_evaluate(smoke_config, str(resumed))
  assert_same_state(restore_latest(straight, smoke_config), restore_latest(resumed, smoke_config))
  for key in ("test_accuracy", "test_loss", "test_examples", "ema_test_accuracy", "ema_test_loss"):
    assert results[key] == expected[key], key
  assert os.listdir(straight / "checkpoints") == os.listdir(resumed / "checkpoints") == ["16"]
  rows = metric_logging.read_metrics(str(straight))
  assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
  assert [r["epoch"] for r in rows if "test_loss" in r] == [2, 4]
  last = metric_logging.read_metrics(str(resumed))[-1]
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate",
              "ema_test_loss"):
    assert last[key] == rows[-1][key], key


@pytest.mark.slow
def test_step_cadences_log_and_checkpoint_mid_epoch_and_change_nothing_else(
    mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  every_step, every_third, resumed = (tmp_path / n for n in ("every_step", "every_third",
                                                             "resumed"))
  smoke_config.input.batch_size = 8  # 8 steps an epoch, 16 in all.
  smoke_config.checkpoint.keep = 10
  smoke_config.update_from_flattened_dict({"log.every_steps": 1, "checkpoint.every_steps": 3})
  train.train_and_evaluate(smoke_config, str(every_step))
  assert sorted(map(int, os.listdir(every_step / "checkpoints"))) == [3, 6, 8, 9, 12, 15, 16]
  single = {r["step"]: r for r in metric_logging.read_metrics(str(every_step))}
  assert sorted(single) == list(range(1, 17))  # Steps 8 and 16: the epochs' own rows.
  smoke_config.update_from_flattened_dict({"log.every_steps": 3, "checkpoint.every_steps": None})
  train.train_and_evaluate(smoke_config, str(every_third))
  assert sorted(map(int, os.listdir(every_third / "checkpoints"))) == [8, 16]
  third = {r["step"]: r for r in metric_logging.read_metrics(str(every_third))}
  assert sorted(third) == [3, 6, 8, 9, 12, 15, 16]
  # A step row averages the steps since the last row; an epoch's end starts anew.
  windows = {3: (1, 2, 3), 6: (4, 5, 6), 9: (9,), 12: (10, 11, 12), 15: (13, 14, 15)}
  for step, window in windows.items():
    for key in ("train_loss", "train_accuracy"):
      np.testing.assert_allclose(third[step][key], np.mean([single[s][key] for s in window]),
                                 rtol=1e-6)
    assert third[step]["learning_rate"] == single[step]["learning_rate"]
  # Logging and mid-epoch checkpoints change nothing; a run resumed mid-epoch is the same run.
  shutil.copytree(every_step, resumed)
  for step in (6, 8, 9, 12, 15, 16):
    shutil.rmtree(resumed / "checkpoints" / str(step))
  train.train_and_evaluate(smoke_config, str(resumed))
  for other in (every_third, resumed):
    assert_same_state(restore_latest(every_step, smoke_config),
                      restore_latest(other, smoke_config))


@pytest.mark.slow
def test_a_non_finite_loss_stops_at_the_first_step_log(mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.update_from_flattened_dict({"log.every_steps": 1, "schedule.learning_rate": 1e30})
  with pytest.raises(FloatingPointError, match=r"in epoch 1 \(step [123]\)\. Stopped; no "
                     "checkpoint was saved before it"):
    train.train_and_evaluate(smoke_config, str(tmp_path))


@pytest.mark.slow
def test_run_py_end_to_end_writes_results_logs_and_checkpoints(trained_workdir):
  stdout = (trained_workdir.parent / "trained.stdout").read_text()
  results = json.loads((trained_workdir / "results.json").read_text())
  assert {"test_accuracy", "test_top5_accuracy", "test_loss", "test_examples", "epochs",
          "params", "macs", "train_images_per_s", "wall_s", "test_per_class_accuracy",
          "test_confusion"} <= set(results)
  assert results["test_examples"] == 40 and results["epochs"] == 2
  assert np.asarray(results["test_confusion"]).sum() == 40
  for weights, line in (("", ""), ("ema_", "weight average (config.ema): ")):
    assert (f"{line}test accuracy {results[f'{weights}test_accuracy']:.4f} (top-5 "
            f"{results[f'{weights}test_top5_accuracy']:.4f}) on 40 examples") in stdout
  assert "total" in stdout and "block13/pointwise/conv" in stdout  # The summary.
  records = metric_logging.read_metrics(str(trained_workdir))
  assert [r["epoch"] for r in records] == [1, 2] and "learning_rate" in records[0]
  # A training image: its MACs x 2 FLOPs forward, x 3 with the backward pass.
  for row in (results, *records):
    assert row["train_gflop_per_s"] == pytest.approx(
        results["macs"] * 6 * row["train_images_per_s"] / 1e9, rel=1e-9)
  # TensorBoard reads the same values at the same steps (float32, as its events hold them).
  events = event_accumulator.EventAccumulator(str(trained_workdir))
  events.Reload()
  logged = {(r["step"], k): v for r in records for k, v in r.items() if k != "step"}
  assert {(e.step, tag): e.value for tag in events.Tags()["scalars"]
          for e in events.Scalars(tag)} == pytest.approx(logged, rel=1e-6)
  assert sorted(os.listdir(trained_workdir / "checkpoints")) == ["4", "8"]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_TFDS / "cifar10").exists(), reason="no prepared CIFAR-10")
def test_a_short_cifar_run_with_every_augmentation_trains(smoke_config, tmp_path):
  # 2,048 real CIFAR-10 images at 32x32, RandAugment, erasing, Mixup and CutMix per batch.
  smoke_config.update_from_flattened_dict({
      **EVERY_AUGMENTATION, "augment.mix_mode": "batch", "data.dir": str(SHARED_TFDS),
      "data.download": False, "data.train_examples": 2048, "data.eval_examples": 256,
      "input.image_size": 32, "input.batch_size": 64, "model.alpha": 0.5, "model.shallow": True,
      "num_epochs": 3, "schedule.learning_rate": 0.1, "schedule.boundaries": (3,),
      "schedule.rates": (0.1,)})
  train.train_and_evaluate(smoke_config, str(tmp_path))
  losses = [row["train_loss"] for row in metric_logging.read_metrics(str(tmp_path))]
  assert losses[0] > losses[1] > losses[2], losses


@pytest.mark.slow
def test_the_profiled_steps_leave_a_trace_where_tensorboards_profile_plugin_lists_runs(
    trained_workdir):
  # The plugin lists each folder of LOGDIR/plugins/profile that holds a HOST.xplane.pb as a run
  # (xprof's profile_plugin.generate_runs). The trained run profiled steps 2 and 3.
  sessions = list((trained_workdir / "plugins" / "profile").iterdir())
  assert len(sessions) == 1
  traces = list(sessions[0].glob("*.xplane.pb"))
  assert len(traces) == 1
  events = {event.name for plane in jax.profiler.ProfileData.from_file(str(traces[0])).planes
            for line in plane.lines for event in line.events}
  # The jit runner's train step was called (parallel.JitRunner's `gathered`) and XLA ran it.
  assert {"PjitFunction(gathered)", "ThunkExecutor::Execute"} <= events


@pytest.mark.parametrize("steps", [(5,), (4, 4), (-1, 3)])
def test_a_bad_profile_range_is_one_line_naming_the_field(smoke_config, tmp_path, steps):
  smoke_config.log.profile_steps = steps
  with pytest.raises(config_lib.errors.ConfigError, match=re.escape(
      f"config.log.profile_steps={steps}: expected (first, end) steps with 0 <= first < end")):
    config_lib.check_config(smoke_config, str(tmp_path))


def test_the_per_class_table_gives_each_class_its_accuracy_and_likeliest_mistake():
  results = {"test_confusion": [[5, 1, 0], [2, 3, 1], [0, 0, 4]],  # Rows: the true class.
             "ema_test_confusion": [[6, 0, 0], [0, 6, 0], [0, 1, 3]]}
  lines = train.per_class_table(results, ("cat", "dog", "fish")).splitlines()
  assert lines[0].split() == ["class", "accuracy", "examples", "most", "often", "mistaken",
                              "for", "(weight", "average)"]
  assert [line.split() for line in lines[1:]] == [
      ["cat", "100.00%", "6", "-"], ["dog", "100.00%", "6", "-"],
      ["fish", "75.00%", "4", "dog", "(25.0%)"]]
  del results["ema_test_confusion"]
  lines = train.per_class_table(results, ("cat", "dog", "fish")).splitlines()
  assert "(weights)" in lines[0]
  assert [line.split() for line in lines[1:]] == [
      ["cat", "83.33%", "6", "dog", "(16.7%)"], ["dog", "50.00%", "6", "cat", "(33.3%)"],
      ["fish", "100.00%", "4", "-"]]


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(
    mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.num_epochs = 1
  train.train_and_evaluate(smoke_config, str(tmp_path))
  smoke_config.update_from_flattened_dict({"num_epochs": 2, "schedule.learning_rate": 1e30,
                                           "schedule.rates": (1e30, 1e30)})
  with pytest.raises(FloatingPointError, match=r"The training loss became (nan|inf) in epoch 2 "
                     r"\(step 8\)\. Stopped; the last good checkpoint \(step 4\) is kept"):
    train.train_and_evaluate(smoke_config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


@pytest.mark.slow
def test_steady_state_loop_makes_no_host_to_device_transfer(mock_tfds, smoke_config):
  del mock_tfds
  from mobilenet_jax import input_pipeline, parallel  # pylint: disable=g-import-not-at-top
  data = input_pipeline.load(smoke_config)
  runner = parallel.create_runner(smoke_config, len(data.train.labels))
  state = runner.put_state(fresh_state(smoke_config, runner.steps_per_epoch))
  train_data = runner.put_train_data(data.train)
  perm = runner.shuffle(state)
  state, _ = runner.train(state, train_data, perm)  # Compile outside the guard.
  with jax.transfer_guard_host_to_device("disallow"):
    for _ in range(3):
      state, metrics = runner.train(state, train_data, perm)
    assert float(runner.metrics(metrics)["count"]) == smoke_config.input.batch_size
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
      runner.train(state, train_data, np.asarray(perm))  # The guard does catch a host input.


@pytest.mark.slow
@pytest.mark.parametrize("input_mode", ["device", "stream"])  # Streamed: the prefetcher stops.
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, input_mode):
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir, log = tmp_path / "run", tmp_path / "log"
  proc = start_mocked(*smoke_args(workdir, "--config.num_epochs=100000",
                                  f"--config.input.mode={input_mode}"), log=log)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "4").exists() and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
  saved = latest_step(workdir)
  assert saved > 4 and f"SIGTERM: saved the checkpoint at step {saved}" in log.read_text()


@pytest.mark.slow
def test_resuming_with_an_incompatible_config_says_so(mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.num_epochs = 1
  train.train_and_evaluate(smoke_config, str(tmp_path))
  smoke_config.num_epochs, smoke_config.model.alpha = 2, 0.5
  with pytest.raises(checkpoints.MismatchedCheckpointError,
                     match="does not fit the configured model or optimizer"):
    train.train_and_evaluate(smoke_config, str(tmp_path))


@pytest.mark.slow
def test_a_tfds_dataset_written_as_arrays_trains_the_same_weights(mock_tfds, trained_config,
                                                                  trained_workdir, tmp_path):
  """tfds -> `arrays.write` (in chunks) -> `npz:` trains what the tfds run trained, bit for bit."""
  del mock_tfds
  data = input_pipeline.load(trained_config)  # The smoke preset's 64 and 40 examples.
  files = arrays.write(data, str(tmp_path / "cifar10"), chunk_bytes=30 * 32 * 32 * 3)
  assert len(files) == 4
  workdir = tmp_path / "from_arrays"
  result = run_mocked(*trained_args(workdir, f"--config.data.name=npz:{tmp_path / 'cifar10'}"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_state(restore_latest(workdir, trained_config),
                    restore_latest(trained_workdir, trained_config))
  read = lambda folder, name: json.loads((folder / name).read_text())
  assert read(workdir, "label_names.json") == read(trained_workdir, "label_names.json")
  assert _untimed(read(workdir, "results.json")) == _untimed(read(trained_workdir, "results.json"))


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_refuses_and_a_killed_runs_lock_is_taken_over(
    trained_config, trained_workdir, tmp_path):
  workdir, lock = tmp_path / "run", tmp_path / "run" / workdirs.LOCK_FILE
  first = start_mocked(*trained_args(workdir), log=tmp_path / "first.log")
  _wait_for(lock, first)
  first.send_signal(signal.SIGSTOP)  # Holding the lock, as a run in the middle of its work.
  try:
    files = sorted(os.listdir(workdir))
    second = run_mocked(*smoke_args(workdir, "--config.schedule.learning_rate=0.2",
                                    "--config.seed=1"))
    assert second.returncode == 1
    assert re.fullmatch(rf"error: {workdir} is in use by another run: pid {first.pid} on "
                        rf"{socket.gethostname()}, since .* UTC .*\n", second.stderr), second.stderr
    assert sorted(os.listdir(workdir)) == files
  finally:
    first.send_signal(signal.SIGCONT)
  assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
  _assert_same_run(workdir, trained_workdir, trained_config)  # As if it had been alone.
  assert not lock.exists()

  # A run killed with its lock in place: the rerun takes it over and resumes.
  killed = start_mocked(*trained_args(workdir, "--config.num_epochs=100000"),
                        log=tmp_path / "killed.log")
  _wait_for(workdir / "checkpoints" / "12", killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert json.loads(lock.read_text())["pid"] == killed.pid
  saved = latest_step(workdir)
  epochs = saved // 4 + 1
  rerun = run_mocked(*trained_args(workdir, f"--config.num_epochs={epochs}"))
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"Took over the lock of pid {killed.pid} on {socket.gethostname()}" in rerun.stderr
  assert f"Resuming from the checkpoint at step {saved}." in rerun.stderr
  assert latest_step(workdir) == 4 * epochs and not lock.exists()


@pytest.mark.slow
def test_a_full_disk_at_a_save_is_one_line_and_the_rerun_resumes_to_the_straight_runs_end(
    mock_tfds, trained_config, trained_workdir, tmp_path, monkeypatch):
  del mock_tfds
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  rename = async_path.rename

  async def full_at_step_8(source, target):  # orbax's last move of a complete save.
    if os.path.basename(str(target)) == "8":
      raise OSError(errno.ENOSPC, "No space left on device", str(target))
    return await rename(source, target)

  monkeypatch.setattr(async_path, "rename", full_at_step_8)
  with pytest.raises(checkpoints.SaveError) as failure:
    train.train_and_evaluate(trained_config, str(tmp_path))
  message = str(failure.value)
  assert "\n" not in message, message
  assert re.search(rf"the checkpoint at step 8 in {tmp_path / 'checkpoints'}: no space left on the "
                   r"device\. A checkpoint takes about \d+\.\d MB there \(\d+\.\d MB free\)\. "
                   r"The checkpoints up to step 4 are kept", message), message
  assert os.listdir(tmp_path / "checkpoints") == ["4"]  # The partial save is gone.
  assert not (tmp_path / workdirs.LOCK_FILE).exists()
  with open(tmp_path / workdirs.METRICS_FILE, "a", encoding="utf-8") as f:
    f.write('{"step": 8, "train_lo')  # And a row cut short, as by a kill mid-write.
  monkeypatch.undo()
  train.train_and_evaluate(trained_config, str(tmp_path))
  _assert_same_run(tmp_path, trained_workdir, trained_config)
