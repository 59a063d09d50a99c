"""The pure train and eval steps.

`train_step` is a pure function of (state, batch, rng): it augments the uint8
batch on device with the sampler's draws, runs the model in train mode (updating
BatchNorm statistics), and applies one update of the optimizer (`optimizers.py`). Under pmap,
`axis_name` names the device axis: gradients are averaged across it and BatchNorm statistics
are synchronized, so the result equals one device processing the whole global batch.
"""
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mobilenet_jax import errors, inference, input_pipeline, models, optimizers, sampler


class TrainState(train_state.TrainState):
  batch_stats: Any


def check_config(config) -> None:
  """Rejects a bad label smoothing (the optimizer and schedule: optimizers.py)."""
  if not 0 <= config.augment.label_smoothing < 1:
    raise errors.ConfigError(f"config.augment.label_smoothing={config.augment.label_smoothing}: "
                             "must be in [0, 1).")


def create_train_state(model, tx, rng, image_size: int) -> TrainState:
  variables = models.init_variables(model, rng, image_size)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


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
  """One optimizer step on `batch`; returns (state, metrics).

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
    return (loss + optimizers.loss_weight_decay(config) * optimizers.l2_penalty(params),
            (logits, updates))

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
