"""The pure train and eval steps.

`train_step` is a pure function of (state, batch, rng): it augments the uint8
batch on device with the sampler's draws (Mixup and CutMix mix the targets too), runs the
model in train mode (updating BatchNorm statistics), applies one update of the optimizer
(`optimizers.py`) and moves the weights' moving average (`config.ema`). Under pmap,
`axis_name` names the device axis: gradients are averaged across it and BatchNorm statistics
are synchronized, so the result equals one device processing the whole global batch.

With `config.optim.micro_batches` = k > 1 the batch's gradient is the mean of k micro-batches'
gradients, computed one after the other (a recipe's batch on fewer or smaller devices), and
BatchNorm normalizes each micro-batch by its own statistics and updates its running averages
k times, as timm's and Keras' gradient accumulation do. Micro-batch j holds rows j, j + k,
j + 2k, ... of the batch, so that each device's block of rows holds its share of every one.
"""
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mobilenet_jax import errors, inference, input_pipeline, mixing, models, optimizers, sampler


class TrainState(train_state.TrainState):
  batch_stats: Any
  # With config.ema.decay > 0, the moving average of the weights: {'params', 'batch_stats'}.
  ema: Any = None


def check_config(config, num_devices: int) -> None:
  """Rejects a bad label smoothing, Mixup or CutMix, weight average or micro-batch count (the
  optimizer and schedule: optimizers.py)."""
  def require(ok, message):
    if not ok:
      raise errors.ConfigError(message)
  require(0 <= config.augment.label_smoothing < 1,
          f"config.augment.label_smoothing={config.augment.label_smoothing}: must be in [0, 1).")
  mixing.check_config(config.augment)
  require(0 <= config.ema.decay < 1,
          f"config.ema.decay={config.ema.decay}: must be in [0, 1) (0: no weight average; "
          "TF-slim's is 0.9999).")
  k, batch = config.optim.micro_batches, config.input.batch_size
  require(k >= 1 and batch % (num_devices * k) == 0,
          f"config.optim.micro_batches={k}: must be >= 1 and divide each device's share of "
          f"config.input.batch_size={batch} ({num_devices} devices): pick a divisor of "
          f"{max(batch // num_devices, 1)}.")


def create_train_state(model, tx, rng, image_size: int, ema: bool = False) -> TrainState:
  """A new TrainState; with `ema`, its weight average starts at the initial weights."""
  variables = models.init_variables(model, rng, image_size)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"], ema=variables if ema else None)


def with_weights(state: TrainState, params, batch_stats) -> TrainState:
  """`state` with these weights, and its weight average (if kept) restarted at them."""
  ema = None if state.ema is None else {"params": params, "batch_stats": batch_stats}
  return state.replace(params=params, batch_stats=batch_stats, ema=ema)


def averaged(state: TrainState) -> TrainState:
  """`state` with its weight average in place of the weights (evaluated like them)."""
  return state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])


def ema_decay(config, step):
  """The average's decay at update `step` (counted from 0): `config.ema.decay`, and with
  `num_updates` at most (1 + step) / (10 + step), TensorFlow's ExponentialMovingAverage
  warm-up with TF-slim's global step as num_updates."""
  decay = config.ema.decay
  return jnp.minimum(decay, (1 + step) / (10 + step)) if config.ema.num_updates else decay


def _update_ema(state: TrainState, config, step) -> TrainState:
  """average -= (1 - decay) * (average - weights): TensorFlow's form of the update."""
  if state.ema is None:
    return state
  rate = 1 - ema_decay(config, step)
  weights = {"params": state.params, "batch_stats": state.batch_stats}
  return state.replace(ema=jax.tree.map(lambda a, w: a - rate * (a - w), state.ema, weights))


def training_loss(logits, targets):
  """Mean cross-entropy against soft `targets` (`mixing.targets`, or mixed by `mixing.mix`)."""
  return optax.softmax_cross_entropy(logits, targets).mean()


def _metrics(logits, labels, mask=None):
  """Sums (not means), so that batches and devices combine by addition."""
  mask = jnp.ones_like(labels, jnp.float32) if mask is None else mask
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {"loss": jnp.sum(loss * mask),
          "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
          "count": jnp.sum(mask)}


def train_step(state: TrainState, batch, rng, config, axis_name: str | None = None):
  """One optimizer step on `batch`; returns (state, metrics).

  `batch`: a `sampler.Sampler.batch`: uint8 NHWC 'image', int32 'label', and each image's
  augmentation draws (`Sampler.draws`), applied here on device.
  `rng`: the step's key (`Sampler.step_key`), which dropout draws from.
  """
  images = input_pipeline.preprocess(batch["image"], config, draws=batch)
  labels, smoothing = batch["label"], config.augment.label_smoothing
  if mixing.enabled(config.augment):
    images, targets, labels = mixing.mix(images, labels, batch, config.model.num_classes,
                                         smoothing, axis_name)
  else:
    targets = mixing.targets(labels, config.model.num_classes, smoothing)
  # Drawn only with config.model.dropout > 0; the augmentation draws used the key itself.
  dropout_key = sampler.dropout_key(rng)

  def micro_step(batch_stats, micro):
    """(gradient, metric sums) of one micro-batch, and the BatchNorm statistics after it."""
    images, targets, labels, key = micro
    def loss_fn(params):
      logits, updates = state.apply_fn({"params": params, "batch_stats": batch_stats},
                                       images, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": key})
      loss = training_loss(logits, targets)
      return (loss + optimizers.loss_weight_decay(config) * optimizers.l2_penalty(params),
              (logits, updates["batch_stats"]))
    grads, (logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    return batch_stats, (grads, _metrics(logits, labels))

  k = config.optim.micro_batches
  if k == 1:
    batch_stats, (grads, metrics) = micro_step(state.batch_stats,
                                               (images, targets, labels, dropout_key))
  else:
    split = lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    keys = jax.random.split(dropout_key, k)
    batch_stats, (grads, metrics) = jax.lax.scan(
        micro_step, state.batch_stats, (split(images), split(targets), split(labels), keys))
    grads = jax.tree.map(lambda g: g.mean(0), grads)
    metrics = jax.tree.map(lambda m: m.sum(0), metrics)
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.psum(metrics, axis_name)
  step = state.step
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return _update_ema(state, config, step), metrics


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
