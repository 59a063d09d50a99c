"""Training: the step, the schedule, determinism, resume, config errors and run.py end to end."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT, run_mocked
from mobilenet_jax import checkpoints, inference, input_pipeline, metric_logging, models, sampler
from mobilenet_jax import steps, train


def _state(config, steps_per_epoch=4):
  model = models.create_model(config.model)
  tx = steps.create_optimizer(config, steps_per_epoch)
  return steps.create_train_state(model, tx, jax.random.key(0), config.image_size)


def _batch(config, n=16):
  """Random images and labels, with augmentation draws as the sampler gives them."""
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.integers(0, 256, (n, 32, 32, 3), np.uint8)),
          "label": jnp.asarray(rng.integers(0, 10, (n,), np.int32)),
          **sampler.augmentation_draws(jax.random.key(0), n, config.crop_padding, config.cutout)}


def test_train_and_eval_step_and_loss_decreases_on_a_fixed_batch(smoke_config):
  smoke_config.augment = "none"
  smoke_config.learning_rate = 0.05
  state, batch = _state(smoke_config), _batch(smoke_config)
  step = jax.jit(lambda s, b: steps.train_step(s, b, jax.random.key(0), smoke_config))
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]) / float(metrics["count"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 15
  sums = steps.eval_step(state, batch["image"], batch["label"], jnp.ones(16), smoke_config,
                         inference.Views())
  assert float(sums["count"]) == 16 and 0 <= float(sums["correct"]) <= 16


def test_the_step_applies_the_flip_decisions_of_the_batch(smoke_config):
  smoke_config.augment = "flip"
  state, batch = _state(smoke_config), _batch(smoke_config)
  step = jax.jit(lambda b: steps.train_step(state, b, jax.random.key(0), smoke_config))
  flipped = step({**batch, "flip": jnp.ones(16, bool)})
  mirrored = step({**batch, "image": batch["image"][:, :, ::-1], "flip": jnp.zeros(16, bool)})
  drawn = step(batch)
  for x, y in zip(jax.tree.leaves(flipped), jax.tree.leaves(mirrored)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert not np.allclose(flipped[1]["loss"], drawn[1]["loss"], rtol=1e-6)


def test_cutout_erases_a_square_of_each_training_image_in_the_step(smoke_config):
  smoke_config.update(augment="none", image_size=32)
  with_cutout = smoke_config.copy_and_resolve_references()
  with_cutout.cutout = 6
  state, batch = _state(smoke_config), _batch(with_cutout)
  erased = (input_pipeline.preprocess(batch["image"], with_cutout, batch) == 0).all(-1).sum((1, 2))
  assert 9 <= int(erased.min()) and int(erased.max()) == 36
  loss = lambda c: steps.train_step(state, batch, jax.random.key(0), c)[1]["loss"]
  assert not np.allclose(loss(with_cutout), loss(smoke_config), rtol=1e-6)


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror(smoke_config):
  state, images = _state(smoke_config), _batch(smoke_config)["image"]
  logits = lambda x, flip: inference.eval_logits(
      state.apply_fn, {"params": state.params, "batch_stats": state.batch_stats}, x, smoke_config,
      inference.Views(flip=flip))
  plain, mirrored = logits(images, False), logits(images[:, :, ::-1], False)
  averaged = logits(images, True)
  scale = float(np.abs(plain).max())  # Logits of an untrained network are small.
  np.testing.assert_allclose(averaged, (plain + mirrored) / 2, rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(logits(images[:, :, ::-1], True), averaged, rtol=1e-4,
                             atol=1e-4 * scale)
  assert np.abs(averaged - plain).max() > 0.05 * scale  # Not a no-op: the net is not symmetric.


def test_eval_shift_averages_a_3x3_grid_of_translations_of_each_view(smoke_config):
  state, images = _state(smoke_config), _batch(smoke_config, n=5)["image"]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  x = input_pipeline.preprocess(images, smoke_config)
  views = [np.roll(np.pad(v, ((0, 0), (2, 2), (2, 2), (0, 0))), (dy, dx), (1, 2))[:, 2:-2, 2:-2]
           for v in (x, x[:, :, ::-1]) for dy in (-2, 0, 2) for dx in (-2, 0, 2)]
  expected = np.mean([state.apply_fn(variables, v, train=False) for v in views], axis=0)
  shifted = inference.eval_logits(state.apply_fn, variables, images, smoke_config,
                                  inference.Views(flip=True, shift=2))
  scale = float(np.abs(expected).max())
  np.testing.assert_allclose(shifted, expected, rtol=1e-4, atol=1e-4 * scale)
  flipped_only = inference.eval_logits(state.apply_fn, variables, images, smoke_config,
                                       inference.Views(flip=True))
  assert np.abs(shifted - flipped_only).max() > 0.05 * scale  # The translations do count.


def test_translate_shifts_with_zero_fill():
  x = jnp.arange(1, 17, dtype=jnp.float32).reshape(1, 4, 4, 1)
  moved = np.asarray(input_pipeline.translate(x, 1, -2))[0, :, :, 0]
  np.testing.assert_array_equal(moved, [[0, 0, 0, 0], [3, 4, 0, 0], [7, 8, 0, 0], [11, 12, 0, 0]])


def test_final_evaluation_adds_the_translations_and_per_epoch_ones_do_not(
    mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.update(num_epochs=1, eval_flip=True, eval_shift=2, learning_rate=0.1)
  # BatchNorm statistics that move in 4 steps, and a rate that moves the weights (Keras' decay
  # 0.99 and 0.01 leave the logits so near uniform that the views hardly differ).
  smoke_config.model.bn_momentum = 0.9
  results = train.train_and_evaluate(smoke_config, str(tmp_path))
  per_epoch = metric_logging.read_metrics(str(tmp_path))[-1]
  final = train.evaluate_checkpoint(smoke_config, str(tmp_path))
  assert final["test_loss"] == pytest.approx(results["test_loss"], rel=1e-6)
  assert final["test_accuracy"] == results["test_accuracy"] and results["test_examples"] == 40
  smoke_config.eval_shift = 0
  unshifted = train.evaluate_checkpoint(smoke_config, str(tmp_path))
  assert unshifted["test_loss"] == pytest.approx(per_epoch["test_loss"], rel=1e-6)
  # The views must change the loss by far more than the 1e-6 the equalities above allow.
  assert abs(unshifted["test_loss"] - results["test_loss"]) > 1e-4 * results["test_loss"], (
      unshifted["test_loss"], results["test_loss"])


def test_in_chunks_keeps_row_order_and_pads_a_partial_last_chunk():
  x = jnp.arange(13 * 2, dtype=jnp.float32).reshape(13, 2)
  calls = []
  def per_row(chunk):
    calls.append(chunk.shape)
    return chunk * 10 + 1
  np.testing.assert_array_equal(inference.in_chunks(per_row, x, 4), x * 10 + 1)
  assert calls == [(4, 2)]  # Traced once by lax.map: 4 chunks of 4 rows (3 rows of padding).
  np.testing.assert_array_equal(inference.in_chunks(per_row, x, 0), x * 10 + 1)
  assert calls[-1] == (13, 2)


def test_chunked_inference_equals_whole_batch_inference(smoke_config):
  state, images = _state(smoke_config), _batch(smoke_config, n=23)["image"]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = {}
  for chunk in (0, 5):  # 46 rows (flipped too): chunks of 5, the last one padded.
    smoke_config.inference_chunk = chunk
    logits[chunk] = jax.jit(lambda x: inference.eval_logits(
        state.apply_fn, variables, x, smoke_config, inference.Views(flip=True)))(images)
  assert logits[0].shape == (23, 10)
  scale = float(np.abs(logits[0]).max())
  np.testing.assert_allclose(logits[5], logits[0], rtol=1e-5, atol=1e-5 * scale)


def test_inference_chunk_is_automatic_per_backend(smoke_config):
  assert smoke_config.inference_chunk is None
  assert inference.inference_chunk(smoke_config, "gpu") == 0
  smoke_config.inference_chunk = 8
  assert inference.inference_chunk(smoke_config, "gpu") == 8
  assert inference.inference_chunk(smoke_config, "cpu") == 8


@pytest.mark.parametrize("preset, overrides, chunk", [
    ("torch", {}, 32),  # Block 1's output: 32x32x64 floats, 256 KiB an image; 8 MiB hold 32.
    ("torch", {"model.alpha": 0.5}, 64),  # 128 KiB: 64.
    ("torch", {"model.dtype": "bfloat16"}, 64),  # Half the bytes.
    ("quick", {}, 64),  # Stride 2, width 1.5: 16x16x96 floats, 96 KiB: 85 fit, so 64.
    ("", {}, 64),  # 64 KiB: 128 fit, capped at 64.
    ("", {"image_size": 224}, 2),  # 112x112x64 floats, 3.1 MiB: 2.
    ("", {"image_size": 1024}, 1),  # 64 MiB: one image at a time.
])
def test_cpu_inference_chunk_keeps_the_largest_activation_within_8_mib(preset, overrides, chunk):
  from configs import cifar  # pylint: disable=g-import-not-at-top
  config = cifar.get_config(preset)
  config.update_from_flattened_dict(overrides)
  assert inference.inference_chunk(config, "cpu") == chunk


def test_batchnorm_statistics_update_in_train_mode(smoke_config):
  state = _state(smoke_config)
  step = jax.jit(lambda s, b: steps.train_step(s, b, jax.random.key(0), smoke_config))
  new, _ = step(state, _batch(smoke_config))
  before = state.batch_stats["stem"]["bn"]["mean"]
  after = new.batch_stats["stem"]["bn"]["mean"]
  assert not np.allclose(before, after)


def test_learning_rate_at_each_boundary(smoke_config):
  smoke_config.learning_rate = 0.01
  smoke_config.lr_boundaries = (100, 200)
  smoke_config.lr_values = (0.001, 0.0001)
  spe = 390
  lr = steps.learning_rate_schedule(smoke_config, spe)
  for step, expected in [(0, 0.01), (100 * spe - 1, 0.01), (100 * spe, 0.001),
                         (200 * spe - 1, 0.001), (200 * spe, 0.0001), (250 * spe, 0.0001)]:
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-6)


def test_weight_decay_skips_depthwise_batchnorm_and_biases(smoke_config):
  smoke_config.model.use_bias = True
  params = _state(smoke_config).params
  expected = 0.5 * sum(float(jnp.sum(w ** 2)) for path, w in
                       jax.tree_util.tree_flatten_with_path(params)[0]
                       if path[-1].key == "kernel" and "depthwise" not in str(path))
  np.testing.assert_allclose(float(steps.l2_penalty(params)), expected, rtol=1e-5)


def test_label_smoothing_mixes_the_uniform_distribution_into_the_targets():
  logits = jax.random.normal(jax.random.key(0), (8, 10)) * 3
  labels = jnp.arange(8) % 10
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  uniform = jnp.mean(jax.nn.logsumexp(logits, -1) - logits.mean(-1))  # CE against 1/10 each.
  np.testing.assert_allclose(steps.training_loss(logits, labels), plain, rtol=1e-6)
  np.testing.assert_allclose(steps.training_loss(logits, labels, 0.2), 0.8 * plain + 0.2 * uniform,
                             rtol=1e-5)


@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", -0.1, "config.learning_rate=-0.1"),
    ("parallel", "vmap", "config.parallel='vmap'"),
    ("lr_boundaries", (20, 10), "strictly increasing"),
    ("lr_values", (0.1,), "same length"),
    ("lr_values", (0.1, 0.0), "positive rates"),
    ("label_smoothing", 1.0, "config.label_smoothing=1.0"),
    ("inference_chunk", -1, "config.inference_chunk=-1"),
    ("eval_shift", -1, "config.eval_shift=-1"),
    ("eval_shift", 16, "in \\[0, image_size=16\\)")])
def test_bad_config_is_rejected_before_training(smoke_config, tmp_path, field, value, match):
  smoke_config[field] = value
  with pytest.raises(ValueError, match=match):
    train.check_config(smoke_config, str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_workdir_is_rejected(smoke_config, tmp_path):
  tmp_path.chmod(0o500)
  with pytest.raises(ValueError, match="--workdir=.* is not writable"):
    train.check_config(smoke_config, str(tmp_path / "run"))


def test_workdir_that_is_a_file_is_rejected(smoke_config, tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match="is not writable"):
    train.check_config(smoke_config, str(tmp_path / "file"))


def _final_params(workdir, config):
  template = _state(config)
  state = checkpoints.Checkpointer(str(workdir), 3).restore(template)
  return jax.tree.leaves(state.params), int(state.step)


def test_determinism_same_seed_same_params(mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.num_epochs = 1
  a = train.train_and_evaluate(smoke_config, str(tmp_path / "a"))
  b = train.train_and_evaluate(smoke_config, str(tmp_path / "b"))
  pa, pb = _final_params(tmp_path / "a", smoke_config), _final_params(tmp_path / "b", smoke_config)
  assert pa[1] == pb[1] == 4
  for x, y in zip(pa[0], pb[0]):
    np.testing.assert_array_equal(x, y)
  assert a["test_accuracy"] == b["test_accuracy"] and a["test_examples"] == 40


def test_a_dataset_of_variable_size_images_without_a_test_split_trains(
    mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.update({"dataset": "tf_flowers", "train_split": "train[:90%]",
                       "eval_split": "train[90%:]", "num_epochs": 1})
  smoke_config.model.num_classes = 5
  results = train.train_and_evaluate(smoke_config, str(tmp_path))
  assert results["test_examples"] == 40 and 0 <= results["test_accuracy"] <= 1
  with open(tmp_path / "label_names.json", encoding="utf-8") as f:
    assert len(json.load(f)) == 5


def test_resume_after_process_exit_equals_a_straight_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  common = ["--config=configs/cifar.py:smoke", "--config.download=False",
            "--config.progress_bar=False", "--config.alternate_flips=True",
            "--config.cutout=4"]
  for workdir, epochs in [(straight, 2), (resumed, 1), (resumed, 2)]:
    result = run_mocked(*common, f"--workdir={workdir}", f"--config.num_epochs={epochs}")
    assert result.returncode == 0, result.stderr[-3000:]
  from configs import cifar  # pylint: disable=g-import-not-at-top
  config = cifar.get_config("smoke")
  (ps, ss), (pr, sr) = _final_params(straight, config), _final_params(resumed, config)
  assert ss == sr == 8
  for x, y in zip(ps, pr):  # Same computations in the same order: bitwise equal.
    np.testing.assert_array_equal(x, y)
  ms, mr = metric_logging.read_metrics(straight), metric_logging.read_metrics(resumed)
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "learning_rate"):
    assert ms[-1][key] == mr[-1][key], key
  rs = json.loads((straight / "results.json").read_text())
  rr = json.loads((resumed / "results.json").read_text())
  assert rs["test_accuracy"] == rr["test_accuracy"] and rs["test_examples"] == 40


def test_run_py_end_to_end_writes_results_logs_and_checkpoints(tmp_path):
  result = run_mocked("--config=configs/cifar.py:smoke", "--config.download=False",
                      f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert {"test_accuracy", "test_loss", "test_examples", "epochs", "params", "macs",
          "train_images_per_s", "wall_s"} <= set(results)
  assert results["test_examples"] == 40 and results["epochs"] == 2
  assert f"test accuracy {results['test_accuracy']:.4f} on 40 examples" in result.stdout
  assert "total" in result.stdout and "block13/pointwise/conv" in result.stdout  # The summary.
  records = metric_logging.read_metrics(str(tmp_path))
  assert [r["epoch"] for r in records] == [1, 2] and "learning_rate" in records[0]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
  args = ["--config=configs/cifar.py:smoke", "--config.download=False", f"--workdir={tmp_path}"]
  assert run_mocked(*args, "--config.num_epochs=1").returncode == 0
  result = run_mocked(*args, "--config.learning_rate=1e30", "--config.lr_values=(1e30, 1e30)")
  assert result.returncode != 0
  assert "The training loss became nan" in result.stderr or "became inf" in result.stderr
  assert "last good checkpoint (step 4)" in result.stderr
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_steady_state_loop_makes_no_host_to_device_transfer(mock_tfds, smoke_config):
  del mock_tfds
  from mobilenet_jax import input_pipeline, parallel  # pylint: disable=g-import-not-at-top
  data = input_pipeline.load(smoke_config)
  runner = parallel.create_runner(smoke_config, len(data.train.labels))
  state = runner.put_state(_state(smoke_config, runner.steps_per_epoch))
  train_data = runner.put_train_data(data.train)
  perm = runner.shuffle(state)
  state, _ = runner.train(state, train_data, perm)  # Compile outside the guard.
  with jax.transfer_guard_host_to_device("disallow"):
    for _ in range(3):
      state, metrics = runner.train(state, train_data, perm)
    assert float(runner.metrics(metrics)["count"]) == smoke_config.batch_size
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
      runner.train(state, train_data, np.asarray(perm))  # The guard does catch a host input.


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  proc = subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "mock_run.py"), "--config=configs/cifar.py:smoke",
       "--config.download=False", "--config.num_epochs=100000", f"--workdir={tmp_path}"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (tmp_path / "checkpoints" / "4").exists() and time.time() < deadline:
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  saved = checkpoints.Checkpointer(str(tmp_path), 3).latest_step()
  assert saved > 4 and f"SIGTERM: saved the checkpoint at step {saved}" in stderr


def test_resuming_with_an_incompatible_config_says_so(tmp_path):
  args = ["--config=configs/cifar.py:smoke", "--config.download=False", f"--workdir={tmp_path}",
          "--config.num_epochs=1"]
  assert run_mocked(*args).returncode == 0
  result = run_mocked(*args, "--config.model.alpha=0.5", "--config.num_epochs=2")
  assert result.returncode != 0
  assert "does not fit the configured model or optimizer" in result.stderr
