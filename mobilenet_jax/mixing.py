"""Mixup and CutMix with timm's semantics (`timm.data.Mixup`), applied in the train step from the
sampler's draws (`sampler.mixing_draws`).

Image i of the global batch is mixed with image n - 1 - i, as timm mixes a batch with its
reverse (`x.flip(0)`). The partner is taken from the global batch whatever the sharding: under
jit the reversal is of the global array; under pmap each device swaps its rows with the
device at the mirrored position. So any device or process count mixes the same pairs.
"""
import jax
import jax.numpy as jnp
import optax

from mobilenet_jax import errors, input_pipeline

MODES = ("batch", "elem")


def check_config(augment) -> None:
  def require(ok, field, expected):
    if not ok:
      raise errors.ConfigError(f"config.augment.{field}={augment[field]!r}: {expected}.")
  for field in ("mix_prob", "mix_switch_prob"):
    require(0 <= augment[field] <= 1, field, "must be a probability, in [0, 1]")
  for field in ("mixup_alpha", "cutmix_alpha"):
    require(augment[field] >= 0, field, "must be >= 0 (0: off; timm's recipes use 0.1-1.0)")
  require(augment.mix_mode in MODES, "mix_mode", f"expected one of {MODES}")


def enabled(augment) -> bool:
  return augment.mixup_alpha > 0 or augment.cutmix_alpha > 0


def _reversed(x, axis_name):
  """The global batch's rows in reverse order, as this device's share of them."""
  if axis_name is None:
    return x[::-1]
  devices = jax.lax.axis_size(axis_name)
  return jax.lax.ppermute(x, axis_name, [(d, devices - 1 - d) for d in range(devices)])[::-1]


def targets(labels, num_classes: int, label_smoothing: float):
  """One-hot labels mixed with `label_smoothing` of the uniform distribution (timm's
  `mixup_target` with lam 1)."""
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)


def mix(images, labels, draws, num_classes: int, label_smoothing: float, axis_name=None):
  """(images, soft targets, labels): Mixup's lam * x + (1 - lam) * partner, or CutMix's box of the
  partner pasted in, with targets mixed at each image's lam (corrected for CutMix); the labels
  are those that weigh more in each target (what training accuracy is counted against)."""
  lam, cut, box = draws["mix_lam"], draws["mix_cut"], draws["mix_box"]
  partner, partner_labels = _reversed(images, axis_name), _reversed(labels, axis_name)
  inside = input_pipeline.in_boxes(*images.shape[1:3], *(box[:, i] for i in range(4)))
  weight = lam[:, None, None, None]
  blended = images * weight + partner * (1 - weight)
  images = jnp.where(cut[:, None, None, None], jnp.where(inside, partner, images), blended)
  own, other = (targets(l, num_classes, label_smoothing) for l in (labels, partner_labels))
  mixed = own * lam[:, None] + other * (1 - lam[:, None])
  return images, mixed, jnp.where(lam >= 0.5, labels, partner_labels)
