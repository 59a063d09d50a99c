"""The pure train and eval steps, and the optimizer they use.

`train_step` is a pure function of (state, batch, rng): it augments the uint8
batch on device with the sampler's draws, runs the model in train mode (updating
BatchNorm statistics), and applies one SGD-Nesterov update. Under pmap, `axis_name` names the device
axis: gradients are averaged across it and BatchNorm statistics are synchronized,
so the result equals one device processing the whole global batch.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mobilenet_jax import errors, inference, input_pipeline, models, sampler


class TrainState(train_state.TrainState):
  batch_stats: Any


def check_config(config) -> None:
  """Rejects a bad `config.optim`, `config.schedule` or label smoothing."""
  optim, schedule = config.optim, config.schedule
  def require(ok, message):
    if not ok:
      raise errors.ConfigError(message)
  require(0 <= optim.momentum < 1, f"config.optim.momentum={optim.momentum}: must be in [0, 1).")
  require(optim.weight_decay >= 0,
          f"config.optim.weight_decay={optim.weight_decay}: must be >= 0.")
  require(0 <= config.augment.label_smoothing < 1,
          f"config.augment.label_smoothing={config.augment.label_smoothing}: must be in [0, 1).")
  require(schedule.learning_rate > 0,
          f"config.schedule.learning_rate={schedule.learning_rate}: must be > 0.")
  require(schedule.reference_batch is None or schedule.reference_batch > 0,
          f"config.schedule.reference_batch={schedule.reference_batch}: must be > 0 (or None: "
          "rates as written).")
  bounds, rates = list(schedule.boundaries), tuple(schedule.rates)
  require(len(bounds) == len(rates) and min(rates, default=1) > 0,
          f"config.schedule.boundaries={tuple(bounds)} and config.schedule.rates={rates} need "
          "the same length (the rate from each boundary on), and positive rates.")
  require(bounds == sorted(bounds) and len(set(bounds)) == len(bounds) and
          all(0 < b for b in bounds),
          f"config.schedule.boundaries={tuple(bounds)}: epochs must be positive and strictly "
          "increasing.")


def learning_rate_schedule(config, steps_per_epoch: int):
  """Piecewise constant: `schedule.learning_rate`, then `rates[i]` from epoch `boundaries[i]`.

  With `reference_batch` set, every rate is scaled by batch_size / reference_batch (linear
  scaling). optax takes each boundary's ratio to the rate before it: converted here, and only here.
  """
  schedule = config.schedule
  rates = (schedule.learning_rate, *schedule.rates)
  scale = (config.input.batch_size / schedule.reference_batch if schedule.reference_batch
           else 1.0)
  return optax.piecewise_constant_schedule(
      schedule.learning_rate * scale, {int(b * steps_per_epoch): after / before for b, before, after
                                       in zip(schedule.boundaries, rates, rates[1:])})


def create_optimizer(config, steps_per_epoch: int):
  return optax.sgd(learning_rate_schedule(config, steps_per_epoch),
                   momentum=config.optim.momentum, nesterov=True)


def create_train_state(model, tx, rng, image_size: int) -> TrainState:
  variables = models.init_variables(model, rng, image_size)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


def l2_penalty(params):
  """0.5 * sum of squared conv/dense kernels, except the depthwise ones (paper, Sec. 3.2)."""
  flat = flax.traverse_util.flatten_dict(params)
  return 0.5 * sum(jnp.sum(jnp.square(w)) for path, w in flat.items()
                   if path[-1] == "kernel" and "depthwise" not in path)


def training_loss(logits, labels, label_smoothing: float = 0.0):
  """Mean cross-entropy against one-hot labels mixed with `label_smoothing` of the uniform."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def _metrics(logits, labels, mask=None):
  """Sums (not means), so that batches and devices combine by addition."""
  mask = jnp.ones_like(labels, jnp.float32) if mask is None else mask
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"loss": jnp.sum(loss * mask),
          "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          "count": jnp.sum(mask)}


def train_step(state: TrainState, batch, rng, config, axis_name: str | None = None):
  """One SGD step on `batch`; returns (state, metrics).

  `batch`: a `sampler.Sampler.batch`: uint8 NHWC 'image', int32 'label', and each image's
  augmentation draws ('shift', 'flip', and 'cutout' with config.augment.cutout), applied here on
  device.
  `rng`: the step's key (`Sampler.step_key`), which dropout draws from.
  """
  images = input_pipeline.preprocess(batch["image"], config, draws=batch)
  # Drawn only with config.model.dropout > 0; the augmentation draws used the key itself.
  dropout_key = sampler.dropout_key(rng)

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     images, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": dropout_key})
    loss = training_loss(logits, batch["label"], config.augment.label_smoothing)
    return loss + config.optim.weight_decay * l2_penalty(params), (logits, updates)

  grads, (logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  metrics = _metrics(logits, batch["label"])
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.psum(metrics, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
  return state, metrics


TOP_K = 5  # Evaluations count top-5 hits beside top-1 (ImageNet results quote both).


def eval_step(state: TrainState, images, labels, mask, config, views: inference.Views):
  """Metric sums over one batch whose padding rows have `mask` 0, with BatchNorm in inference
  mode: loss, top-1 and top-5 hits, count, and the confusion matrix (rows: the true class)."""
  logits = inference.eval_logits(state.apply_fn,
                                 {"params": state.params, "batch_stats": state.batch_stats},
                                 images, config, views)
  num_classes = logits.shape[-1]
  top_k = jax.lax.top_k(logits, min(TOP_K, num_classes))[1]
  truth = jax.nn.one_hot(labels, num_classes) * mask[:, None]
  return {**_metrics(logits, labels, mask),
          "correct_top5": jnp.sum(jnp.any(top_k == labels[:, None], axis=-1) * mask),
          "confusion": truth.T @ jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)}
