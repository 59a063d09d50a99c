"""The pure train and eval steps, and the optimizer they use.

`train_step` is a pure function of (state, batch, rng): it augments the uint8
batch on device, runs the model in train mode (updating BatchNorm statistics),
and applies one SGD-Nesterov update. Under pmap, `axis_name` names the device
axis: gradients are averaged across it and BatchNorm statistics are synchronized,
so the result equals one device processing the whole global batch.
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from mobilenet_jax import input_pipeline, models


class TrainState(train_state.TrainState):
  batch_stats: Any


def learning_rate_schedule(config, steps_per_epoch: int):
  """Piecewise-constant rate: `learning_rate`, then `lr_values[i]` from epoch `lr_boundaries[i]`.

  optax takes each boundary's ratio to the rate before it: converted here, and only here.
  """
  rates = (config.learning_rate, *config.lr_values)
  return optax.piecewise_constant_schedule(
      config.learning_rate, {int(b * steps_per_epoch): after / before for b, before, after
                             in zip(config.lr_boundaries, rates, rates[1:])})


def create_optimizer(config, steps_per_epoch: int):
  return optax.sgd(learning_rate_schedule(config, steps_per_epoch),
                   momentum=config.momentum, nesterov=True)


def create_train_state(model, tx, rng, image_size: int) -> TrainState:
  variables = jax.jit(model.init, static_argnames="train")(
      rng, jnp.zeros((1, image_size, image_size, 3)), train=False)
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

  `batch`: {'image': uint8 NHWC, 'label': int32}, and optionally 'flip' (bool per image),
  flip decisions that replace the random ones (`input_pipeline.alternating_flips`).
  """
  local = batch["label"].shape[0]
  draws = input_pipeline.augmentation_draws(rng, config.batch_size, config.crop_padding,
                                            config.cutout)
  if axis_name is not None:  # This device's slice of the global batch's draws.
    start = jax.lax.axis_index(axis_name) * local
    draws = jax.tree.map(lambda d: jax.lax.dynamic_slice_in_dim(d, start, local), draws)
  if "flip" in batch:
    draws["flip"] = batch["flip"]
  images = input_pipeline.preprocess(batch["image"], config, draws)
  # Drawn only with config.model.dropout > 0, so the augmentation's key stays as it was.
  dropout_key = jax.random.fold_in(rng, 1)
  if axis_name is not None:
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(axis_name))

  def loss_fn(params):
    logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                     images, train=True, mutable=["batch_stats"],
                                     rngs={"dropout": dropout_key})
    loss = training_loss(logits, batch["label"], config.label_smoothing)
    return loss + config.weight_decay * l2_penalty(params), (logits, updates)

  grads, (logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
  metrics = _metrics(logits, batch["label"])
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.psum(metrics, axis_name)
  state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
  return state, metrics


# Inference sub-batches on CPU (evaluation, predict): as many images as keep the largest
# activation within 8 MiB, so that each layer's input and output stay in the L3 cache (32 MiB
# here) instead of every BatchNorm, ReLU and pad pass going to memory; and at most 64, since
# whole batches of the stride-2 network (8 MiB) ran 2-6% slower than halves (docs/speed.md).
CPU_INFERENCE_BYTES = 8 << 20
CPU_INFERENCE_MAX_CHUNK = 64


def inference_chunk(config, backend: str | None = None) -> int:
  """`config.inference_chunk`, with None (auto) resolved: on CPU the largest power of two that
  fits `CPU_INFERENCE_BYTES` (at most 64 images), elsewhere 0 (the whole batch at once)."""
  chunk = config.inference_chunk
  if chunk is None:
    if (backend or jax.default_backend()) != "cpu":
      return 0
    fit = max(1, CPU_INFERENCE_BYTES // models.largest_activation_bytes(config.model,
                                                                         config.image_size))
    return min(CPU_INFERENCE_MAX_CHUNK, 1 << (fit.bit_length() - 1))
  if chunk < 0:
    raise ValueError(f"config.inference_chunk={chunk}: expected a number of images >= 1, "
                     "0 (the whole batch at once) or None (automatic).")
  return chunk


def in_chunks(fn, x, chunk: int):
  """`fn(x)` for a per-example `fn`, computed on sub-batches of `chunk` rows of `x` in turn.

  Sub-batch j holds rows j, j + n, j + 2n, ... (n sub-batches), so that a batch sharded
  in contiguous blocks over devices stays sharded the same way within each sub-batch.
  """
  size = x.shape[0]
  if not chunk or size <= chunk:
    return fn(x)
  n = -(-size // chunk)
  x = jnp.pad(x, [(0, n * chunk - size)] + [(0, 0)] * (x.ndim - 1))
  ys = jax.lax.map(fn, jnp.swapaxes(x.reshape(chunk, n, *x.shape[1:]), 0, 1))
  return jnp.swapaxes(ys, 0, 1).reshape(n * chunk, *ys.shape[2:])[:size]


def eval_logits(apply_fn, variables, images, config, shift: int = 0):
  """Inference-mode logits of uint8 images, as evaluation and prediction compute them.

  They are the mean logits over test-time views, run through the model as one batch: with
  `config.eval_flip`, each image and its mirror image; with `shift` > 0, each of those also
  translated by -shift, 0 and +shift pixels along each axis (a 3x3 grid, zero fill).
  Cheap test-time augmentation that stays in distribution, since training flips and
  translates too.
  """
  x = input_pipeline.preprocess(images, config)
  views = [x, x[:, :, ::-1]] if config.eval_flip else [x]
  if shift:
    offsets = (-shift, 0, shift)
    views = [input_pipeline.translate(v, dy, dx) for v in views for dy in offsets for dx in offsets]
  logits = in_chunks(lambda x: apply_fn(variables, x, train=False), jnp.concatenate(views),
                     inference_chunk(config))
  return logits.reshape(len(views), len(images), -1).mean(0)


def eval_step(state: TrainState, images, labels, mask, config, shift: int = 0):
  """Metric sums over one (padded) batch, with BatchNorm in inference mode."""
  logits = eval_logits(state.apply_fn, {"params": state.params, "batch_stats": state.batch_stats},
                       images, config, shift)
  return _metrics(logits, labels, mask)
