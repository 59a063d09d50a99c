"""The model at inference time, as evaluation and `predict` run it: test-time views and CPU
sub-batches (images of any size are fitted to its input by `images.py`)."""
import dataclasses

import jax
import jax.numpy as jnp

from mobilenet_jax import errors, input_pipeline, models

# Inference sub-batches on CPU (evaluation, predict): as many images as keep the largest
# activation within 8 MiB, so that each layer's input and output stay in the L3 cache (32 MiB
# here) instead of every BatchNorm, ReLU and pad pass going to memory; and at most 64, since
# whole batches of the stride-2 network (8 MiB) ran 2-6% slower than halves (docs/speed.md).
CPU_INFERENCE_BYTES = 8 << 20
CPU_INFERENCE_MAX_CHUNK = 64


@dataclasses.dataclass(frozen=True)
class Views:
  """The test-time views whose logits are averaged: each image, with `flip` also its mirror
  image, and with `shift` > 0 each of those translated by -shift, 0 and +shift pixels along
  each axis (a 3x3 grid, zero fill). Cheap test-time augmentation that stays in distribution,
  since training flips and translates too."""
  flip: bool = False
  shift: int = 0

  @classmethod
  def of(cls, config, shift: bool = True) -> "Views":
    """`config.eval.flip` and `config.eval.shift`; with `shift=False` no translations (the
    per-epoch evaluations, which they would make 9x as costly)."""
    return cls(bool(config.eval.flip), int(config.eval.shift) if shift else 0)


def check_config(config) -> None:
  if not 0 <= config.eval.shift < config.input.image_size:
    raise errors.ConfigError(
        f"config.eval.shift={config.eval.shift}: test-time translations need a "
        f"number of pixels in [0, image_size={config.input.image_size}); 0 turns "
        "them off.")
  if config.eval.chunk is not None and config.eval.chunk < 0:
    raise errors.ConfigError(
        f"config.eval.chunk={config.eval.chunk}: expected a number of "
        "images >= 1, 0 (the whole batch at once) or None (automatic).")


def inference_chunk(config, backend: str | None = None) -> int:
  """`config.eval.chunk`, with None (auto) resolved: on CPU the largest power of two that
  fits `CPU_INFERENCE_BYTES` (at most 64 images), elsewhere 0 (the whole batch at once)."""
  if config.eval.chunk is not None:
    return config.eval.chunk
  if (backend or jax.default_backend()) != "cpu":
    return 0
  fit = max(1, CPU_INFERENCE_BYTES // models.largest_activation_bytes(config.model,
                                                                       config.input.image_size))
  return min(CPU_INFERENCE_MAX_CHUNK, 1 << (fit.bit_length() - 1))


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


def eval_logits(apply_fn, variables, images, config, views: Views):
  """Inference-mode logits of uint8 images: the mean over `views`, run through the model as
  one batch (in sub-batches of `inference_chunk(config)` images)."""
  x = input_pipeline.preprocess(images, config)
  xs = [x, x[:, :, ::-1]] if views.flip else [x]
  if views.shift:
    offsets = (-views.shift, 0, views.shift)
    xs = [input_pipeline.translate(v, dy, dx) for v in xs for dy in offsets for dx in offsets]
  logits = in_chunks(lambda x: apply_fn(variables, x, train=False), jnp.concatenate(xs),
                     inference_chunk(config))
  return logits.reshape(len(xs), len(images), -1).mean(0)


