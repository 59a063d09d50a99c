"""The pure steps against expectations computed another way: the update SGD-Nesterov makes with
weight decay and label smoothing, BatchNorm's running averages, and metrics over padding."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import fresh_state as _state, random_batch as _batch
from mobilenet_jax import inference, input_pipeline, mixing, optimizers, parallel, steps, train


class _Traced:
  """`config` with some fields ('group.name': value) replaced by traced values: one compile
  serves every value."""

  def __init__(self, config, values):
    self._config, self._values = config, values

  def __getattr__(self, name):
    inner = {k.split(".", 1)[1]: v for k, v in self._values.items() if k.startswith(f"{name}.")}
    value = self._values.get(name, getattr(self._config, name))
    return _Traced(value, inner) if inner else value


# Plain SGD steps: no augmentation, a rate that moves the weights; most step tests share them.
_PLAIN = {"augment.name": "none", "schedule.learning_rate": 0.1, "optim.momentum": 0.9}


def _configured(config, overrides):
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(overrides)
  return config


def _stepper(config):
  """`config`'s jitted train step, (state, batch) -> (state, metrics). Weight decay and label
  smoothing are traced, so that a test's variants share one program (and, through XLA's
  cache, one compile)."""
  step = jax.jit(lambda s, b, decay, smoothing: steps.train_step(
      s, b, jax.random.key(0), _Traced(config, {"optim.weight_decay": decay,
                                                   "augment.label_smoothing": smoothing})))
  return lambda state, batch: step(state, batch, config.optim.weight_decay,
                                   config.augment.label_smoothing)


def _one_step(config, overrides):
  """(state before, state after one step, metrics) with `overrides` of the config's fields."""
  config = _configured(config, overrides)
  state = _state(config)
  return (state, *_stepper(config)(state, _batch(config)))


def _eval_sums(state, images, labels, mask, config):
  return jax.jit(lambda s, i, l, m: steps.eval_step(s, i, l, m, config, inference.Views()))(
      state, images, labels, mask)


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


@pytest.mark.slow
def test_the_first_update_is_nesterov_momentum_over_the_decayed_gradient(smoke_config):
  # The data gradient is the same with and without decay, so the updates differ by exactly
  # lr * (1 + momentum) * weight_decay * w on decayed kernels (Nesterov's first step is
  # (1 + m) g; heavy-ball momentum's would be g), and by nothing elsewhere.
  lr, momentum, decay = _PLAIN["schedule.learning_rate"], _PLAIN["optim.momentum"], 0.5
  before, plain, _ = _one_step(smoke_config, {"optim.weight_decay": 0.0, **_PLAIN})
  _, decayed, _ = _one_step(smoke_config, {"optim.weight_decay": decay, **_PLAIN})
  w, p, d = _flat(before.params), _flat(plain.params), _flat(decayed.params)
  decayed_paths = [k for k in w if k[-1] == "kernel" and "depthwise" not in k]
  assert len(decayed_paths) == 15  # Stem, 13 pointwise convolutions, head.
  for path in w:
    expected = -lr * (1 + momentum) * decay * np.asarray(w[path]) if path in decayed_paths else 0
    np.testing.assert_allclose(d[path] - p[path], expected, rtol=2e-3,
                               atol=1e-6 * float(np.abs(w[path]).max()), err_msg=str(path))


@pytest.mark.slow
def test_label_smoothing_moves_the_head_bias_by_its_share_of_the_uniform(smoke_config):
  # The head bias's gradient is mean(softmax - target); smoothing by s changes the targets by
  # s * (1/K - onehot), so the biases after one step differ by lr (1 + m) s (mean onehot - 1/K).
  lr, momentum, smoothing = _PLAIN["schedule.learning_rate"], _PLAIN["optim.momentum"], 0.2
  common = {**_PLAIN, "optim.weight_decay": 0.0}
  _, plain, plain_metrics = _one_step(smoke_config, {"augment.label_smoothing": 0.0, **common})
  _, smoothed, smoothed_metrics = _one_step(smoke_config, {"augment.label_smoothing": smoothing,
                                                               **common})
  onehot = np.eye(10)[np.asarray(_batch(smoke_config)["label"])]
  expected = -lr * (1 + momentum) * smoothing * (onehot.mean(0) - 0.1)
  np.testing.assert_allclose(smoothed.params["head"]["bias"] - plain.params["head"]["bias"],
                             expected, rtol=1e-3, atol=1e-7)
  # The logged loss stays plain cross-entropy: the same forward pass, the same sums.
  np.testing.assert_array_equal(plain_metrics["loss"], smoothed_metrics["loss"])


@pytest.mark.slow
def test_batchnorm_running_averages_decay_by_the_configured_momentum(smoke_config):
  # From mean 0 and variance 1, one step leaves momentum * init + (1 - momentum) * batch's.
  # Two momenta on the same batch must agree on the batch's statistics.
  stats = {}
  for m in (0.9, 0.99):
    _, new, _ = _one_step(smoke_config, {"augment.name": "none", "model.bn_momentum": m})
    bn = new.batch_stats["stem"]["bn"]
    stats[m] = (np.asarray(bn["mean"]) / (1 - m), (np.asarray(bn["var"]) - m) / (1 - m))
  assert np.abs(stats[0.9][0]).max() > 1e-2  # The batch's mean is not zero.
  for a, b in zip(stats[0.9], stats[0.99]):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(a).max())


def _numpy_metrics(logits, labels):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return {"loss": -log_probs[np.arange(len(labels)), labels].sum(),
          "correct": float((logits.argmax(-1) == labels).sum()), "count": float(len(labels))}


def _plain_logits(state, images, config):
  """The model's logits on `images`, the model called directly (no views, no chunks)."""
  return jax.jit(lambda s, i: s.apply_fn({"params": s.params, "batch_stats": s.batch_stats},
                                         input_pipeline.preprocess(i, config), train=False))(
                                             state, images)


def test_eval_step_counts_only_the_unmasked_examples(smoke_config):
  state, batch = _state(smoke_config), _batch(smoke_config)
  mask = jnp.asarray([1.0] * 10 + [0.0] * 6)
  sums = _eval_sums(state, batch["image"], batch["label"], mask, smoke_config)
  expected = _numpy_metrics(_plain_logits(state, batch["image"][:10], smoke_config),
                            np.asarray(batch["label"][:10]))
  for k, v in expected.items():
    np.testing.assert_allclose(float(sums[k]), v, rtol=1e-5, err_msg=k)


def test_evaluation_over_a_split_counts_every_example_once(smoke_config):
  # 37 examples in batches of 16: 11 of the last batch are padding.
  state = _state(smoke_config)
  rng = np.random.default_rng(3)
  split = input_pipeline.Split(rng.integers(0, 256, (37, 32, 32, 3), np.uint8),
                               rng.integers(0, 10, (37,), np.int32))
  runner = parallel.create_runner(smoke_config, 64)
  sums = runner.metrics(runner.evaluate(runner.put_state(state), *runner.put_eval_data(split),
                                        inference.Views()))
  expected = _numpy_metrics(_plain_logits(state, jnp.asarray(split.images), smoke_config),
                            split.labels)
  for k, v in expected.items():
    np.testing.assert_allclose(float(sums[k]), v, rtol=1e-5, err_msg=k)


def test_padding_rows_that_the_model_would_classify_correctly_are_never_counted(smoke_config):
  # Every image, the all-zero padding rows included, gets the logits of the head's bias: class
  # 0 first, then 1..4 (top-5). Padding rows carry label 0, so each would be a top-1 and top-5
  # hit and a diagonal count of class 0 if the mask were missing anywhere.
  state = _state(smoke_config)
  bias = np.linspace(3.0, 0.0, 10).astype(np.float32)
  params = flax.core.unfreeze(state.params)
  params["head"] = {"kernel": np.zeros_like(params["head"]["kernel"]), "bias": bias}
  state = state.replace(params=params)
  rng = np.random.default_rng(4)
  labels = rng.integers(1, 10, (21,), np.int32)  # 21 in batches of 16: 11 padding rows.
  labels[:3] = 0
  split = input_pipeline.Split(rng.integers(0, 256, (21, 16, 16, 3), np.uint8), labels)
  runner = parallel.create_runner(smoke_config, 64)
  sums = train._sum(runner.metrics(runner.evaluate(
      runner.put_state(state), *runner.put_eval_data(split), inference.Views())))
  results = train._test_results({"": sums})  # pylint: disable=protected-access
  confusion = np.zeros((10, 10))
  np.add.at(confusion, (labels, 0), 1)  # Every example predicted as class 0.
  loss = np.log(np.exp(bias).sum()) - bias[labels]
  assert results["test_examples"] == 21
  np.testing.assert_allclose(results["test_accuracy"], np.mean(labels == 0))
  np.testing.assert_allclose(results["test_top5_accuracy"], np.mean(labels < 5))
  np.testing.assert_allclose(results["test_loss"], loss.mean(), rtol=1e-6)
  np.testing.assert_array_equal(results["test_confusion"], confusion)
  np.testing.assert_allclose(results["test_per_class_accuracy"],
                             [1.0] + [0.0] * 9)  # Class 0: its 3 examples; padding not among them.


@pytest.mark.slow
def test_the_training_loss_on_a_fixed_batch_falls(smoke_config):
  config = _configured(smoke_config, _PLAIN)
  state, batch, step = _state(config), _batch(config), _stepper(config)
  losses = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]) / float(metrics["count"]))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 15
  sums = _eval_sums(state, batch["image"], batch["label"], jnp.ones(16), config)
  expected = _numpy_metrics(_plain_logits(state, batch["image"], config),
                            np.asarray(batch["label"]))
  assert float(sums["correct"]) == expected["correct"]


@pytest.mark.slow
def test_the_step_applies_the_flip_decisions_of_the_batch(smoke_config):
  smoke_config.augment.name = "flip"
  state, batch = _state(smoke_config), _batch(smoke_config)
  step = functools.partial(_stepper(smoke_config), state)
  flipped = step({**batch, "flip": jnp.ones(16, bool)})
  mirrored = step({**batch, "image": batch["image"][:, :, ::-1], "flip": jnp.zeros(16, bool)})
  drawn = step(batch)
  for x, y in zip(jax.tree.leaves(flipped), jax.tree.leaves(mirrored)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert not np.allclose(flipped[1]["loss"], drawn[1]["loss"], rtol=1e-6)


@pytest.mark.slow
def test_cutout_erases_a_square_of_each_training_image_in_the_step(smoke_config):
  smoke_config.update_from_flattened_dict({"augment.name": "none", "input.image_size": 32})
  with_cutout = _configured(smoke_config, {"augment.cutout": 6})
  state, batch = _state(smoke_config), _batch(with_cutout)
  erased = (input_pipeline.preprocess(batch["image"], with_cutout, batch) == 0).all(-1).sum((1, 2))
  assert 9 <= int(erased.min()) and int(erased.max()) == 36
  loss = lambda c: _stepper(c)(state, batch)[1]["loss"]
  assert not np.allclose(loss(with_cutout), loss(smoke_config), rtol=1e-6)


def test_learning_rate_at_each_boundary(smoke_config):
  smoke_config.schedule.learning_rate = 0.01
  smoke_config.schedule.boundaries = (100, 200)
  smoke_config.schedule.rates = (0.001, 0.0001)
  spe = 390
  lr = optimizers.learning_rate_schedule(smoke_config, spe)
  for step, expected in [(0, 0.01), (100 * spe - 1, 0.01), (100 * spe, 0.001),
                         (200 * spe - 1, 0.001), (200 * spe, 0.0001), (250 * spe, 0.0001)]:
    np.testing.assert_allclose(float(lr(step)), expected, rtol=1e-6)


def test_weight_decay_skips_depthwise_batchnorm_and_biases(smoke_config):
  smoke_config.model.use_bias = True
  params = _state(smoke_config).params
  expected = 0.5 * sum(float(jnp.sum(w ** 2)) for path, w in
                       jax.tree_util.tree_flatten_with_path(params)[0]
                       if path[-1].key == "kernel" and "depthwise" not in str(path))
  np.testing.assert_allclose(float(optimizers.l2_penalty(params)), expected, rtol=1e-5)


def test_label_smoothing_mixes_the_uniform_distribution_into_the_targets():
  logits = jax.random.normal(jax.random.key(0), (8, 10)) * 3
  labels = jnp.arange(8) % 10
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  uniform = jnp.mean(jax.nn.logsumexp(logits, -1) - logits.mean(-1))  # CE against 1/10 each.
  loss = lambda smoothing: steps.training_loss(logits, mixing.targets(labels, 10, smoothing))
  np.testing.assert_allclose(loss(0.0), plain, rtol=1e-6)
  np.testing.assert_allclose(loss(0.2), 0.8 * plain + 0.2 * uniform, rtol=1e-5)


@pytest.mark.slow
def test_the_weight_average_follows_tensorflows_recurrence_with_its_warm_up(smoke_config):
  # TensorFlow's ExponentialMovingAverage with num_updates: decay_t = min(0.9, (1+t)/(10+t))
  # (0.1, 0.18, 0.25, ...: the warm-up decides every step here), over params and BatchNorm
  # statistics, from the initial weights; computed in float64 from each step's weights.
  config = _configured(smoke_config, {**_PLAIN, "ema.decay": 0.9, "ema.num_updates": True})
  state, batch = _state(config), _batch(config)
  step = jax.jit(lambda s: steps.train_step(s, batch, jax.random.key(0), config))
  weights = lambda s: jax.tree.map(lambda x: np.asarray(x, np.float64),
                                   {"params": s.params, "batch_stats": s.batch_stats})
  expected = weights(state)
  for t in range(4):
    state, _ = step(state)
    decay = min(0.9, (1 + t) / (10 + t))
    expected = jax.tree.map(lambda a, w, d=decay: d * a + (1 - d) * w, expected, weights(state))
  assert set(_flat(state.ema)) == set(_flat(expected))
  for path, value in _flat(expected).items():
    np.testing.assert_allclose(_flat(state.ema)[path], value, rtol=1e-5,
                               atol=1e-6 * max(1.0, np.abs(value).max()), err_msg=str(path))
  # It is not the weights themselves: the average lags them.
  assert not np.allclose(state.ema["params"]["head"]["kernel"], state.params["head"]["kernel"])


class _NoBatchNorm(flax.linen.Module):
  """Two dense layers: a micro-batch's gradient depends on its examples alone. Its one
  'batch_stats' variable counts the training passes (BatchNorm's updates, one per pass)."""

  @flax.linen.compact
  def __call__(self, x, train: bool = False):
    passes = self.variable("batch_stats", "passes", lambda: jnp.zeros((), jnp.int32))
    if train:
      passes.value += 1
    hidden = flax.linen.relu(flax.linen.Dense(32)(x.reshape(x.shape[0], -1)))
    return flax.linen.Dense(10)(hidden)


@pytest.mark.slow
def test_micro_batches_give_the_step_of_the_whole_batch_without_batchnorm(smoke_config):
  # Momentum and L2 decay, two steps: the accumulated mean gradient must equal the batch's.
  config = _configured(smoke_config, {**_PLAIN, "optim.weight_decay": 0.01})
  model, batch = _NoBatchNorm(), _batch(config)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  results = {}
  for k in (1, 4):
    config.optim.micro_batches = k
    state = steps.TrainState.create(apply_fn=model.apply, params=variables["params"],
                                    tx=optimizers.create_optimizer(config, 4),
                                    batch_stats=variables["batch_stats"])
    step = jax.jit(functools.partial(steps.train_step, config=config))
    metrics = []
    for i in range(2):
      state, m = step(state, batch, jax.random.key(i))
      metrics.append(m)
    results[k] = (state, metrics)
  (whole, whole_metrics), (micro, micro_metrics) = results[1], results[4]
  assert int(whole.batch_stats["passes"]) == 2 and int(micro.batch_stats["passes"]) == 8
  for path, value in _flat(whole.params).items():
    np.testing.assert_allclose(_flat(micro.params)[path], value, rtol=1e-5, atol=1e-6,
                               err_msg=str(path))
  assert not np.allclose(whole.params["Dense_1"]["bias"], variables["params"]["Dense_1"]["bias"])
  for a, b in zip(whole_metrics, micro_metrics):
    np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-5)
    assert float(b["correct"]) == float(a["correct"]) and float(b["count"]) == 16
