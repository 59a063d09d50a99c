"""The optimizer, its learning-rate schedule and the weight-decay rule, built from
`config.optim` and `config.schedule` here and only here (as big_vision builds its optax chain):
the next optimizer is one entry in OPTIMIZERS, the next schedule one in SCHEDULES.

Weight decay is one of two things (`optim.decay`): 'l2', a penalty of
`weight_decay / 2 * |w|^2` in the loss, whose gradient then goes through the optimizer's
statistics (the Keras, PyTorch and TF-slim recipes: SGD and RMSProp default to it), or
'decoupled', `-rate * weight_decay * w` added to the update outside them (Loshchilov & Hutter's
AdamW; LAMB inside its trust ratio: AdamW and LAMB default to it). Either way it applies to the
weights `decays` names: conv and dense kernels, not the depthwise ones (the paper, Sec. 3.2),
not BatchNorm, not biases.
"""
import math

import flax
import jax
import jax.numpy as jnp
import optax

from mobilenet_jax import errors

DECAY_STYLES = ("l2", "decoupled")


def decays(params):
  """Which weights decay: a tree of bools like `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict(
      {path: path[-1] == "kernel" and "depthwise" not in path for path in flat})


def l2_penalty(params):
  """0.5 * the sum of the squared weights that decay (`decays`)."""
  flat, mask = (flax.traverse_util.flatten_dict(t) for t in (params, decays(params)))
  return 0.5 * sum(jnp.sum(jnp.square(w)) for path, w in flat.items() if mask[path])


def decay_style(optim) -> str:
  """'l2' or 'decoupled': `optim.decay`, or the optimizer's own (OPTIMIZERS)."""
  return optim.decay or OPTIMIZERS[optim.name][0]


def loss_weight_decay(config) -> float:
  """The L2 penalty's factor in the training loss (0 when the decay is decoupled)."""
  return config.optim.weight_decay if decay_style(config.optim) == "l2" else 0.0


def _decoupled(rate, weight_decay: float):
  """-rate(step) * weight_decay * w added to the update of each decaying weight."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    step_rate = rate(state.count)
    updates = jax.tree.map(lambda u, w, d: u - step_rate * weight_decay * w if d else u,
                           updates, params, decays(params))
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))
  return optax.GradientTransformation(init, update)


def _sgd(optim, rate, decay: float):
  tx = optax.sgd(rate, momentum=optim.momentum, nesterov=optim.nesterov)
  return optax.chain(tx, _decoupled(rate, decay)) if decay else tx


def _rmsprop(optim, rate, decay: float):
  """TensorFlow's RMSProp (tf.compat.v1.train.RMSPropOptimizer, which TF-slim and the paper
  used), which optax's takes as these arguments: the mean square starts at `rms_initial` (1),
  epsilon is added inside the square root, and the rate scales the step before the momentum
  accumulates it (timm's `RMSpropTF` likewise)."""
  tx = optax.rmsprop(rate, decay=optim.rms_decay, eps=_epsilon(optim),
                     initial_scale=optim.rms_initial, eps_in_sqrt=True, momentum=optim.momentum)
  return optax.chain(tx, _decoupled(rate, decay)) if decay else tx


def _adamw(optim, rate, decay: float):
  return optax.adamw(rate, b1=optim.b1, b2=optim.b2, eps=_epsilon(optim), weight_decay=decay,
                     mask=decays)


def _lamb(optim, rate, decay: float):
  """optax's LAMB (You et al., 2020): the trust ratio on every weight, the decay inside it."""
  return optax.lamb(rate, b1=optim.b1, b2=optim.b2, eps=_epsilon(optim), weight_decay=decay,
                    mask=decays)


# name: (its weight decay by default, builder(optim, rate, decoupled decay), its epsilon).
OPTIMIZERS = {
    "sgd": ("l2", _sgd, None),
    "rmsprop": ("l2", _rmsprop, 1.0),  # TF-slim's --opt_epsilon.
    "adamw": ("decoupled", _adamw, 1e-8),
    "lamb": ("decoupled", _lamb, 1e-6),
}


def _epsilon(optim) -> float:
  return OPTIMIZERS[optim.name][2] if optim.epsilon is None else optim.epsilon


def create_optimizer(config, steps_per_epoch: int):
  """config.optim's optimizer on config.schedule's rates, with gradient clipping if set."""
  optim = config.optim
  rate = learning_rate_schedule(config, steps_per_epoch)
  decay = optim.weight_decay if decay_style(optim) == "decoupled" else 0.0
  tx = OPTIMIZERS[optim.name][1](optim, rate, decay)
  if optim.clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), tx)
  return tx


def _piecewise(schedule, base: float, scale: float, steps_per_epoch: int, total: int):
  """`base`, then `rates[i]` from epoch `boundaries[i]` (optax takes each boundary's ratio to
  the rate before it: converted here)."""
  del scale, total
  rates = (schedule.learning_rate, *schedule.rates)
  return optax.piecewise_constant_schedule(
      base, {int(b * steps_per_epoch): after / before for b, before, after
             in zip(schedule.boundaries, rates, rates[1:])})


def _cosine(schedule, base: float, scale: float, steps_per_epoch: int, total: int):
  """From `base` at step 0 to `final_rate` at the run's end, along half a cosine."""
  del steps_per_epoch
  final = schedule.final_rate * scale
  return lambda step: final + 0.5 * (base - final) * (1 + jnp.cos(math.pi * step / total))


def _exponential(schedule, base: float, scale: float, steps_per_epoch: int, total: int):
  """`base * decay_factor ** (epoch / decay_epochs)`; with `staircase`, the exponent is
  floored (TF-slim's exponential_decay: 0.94 every 2.5 epochs at batch 64 for MobileNetV1)."""
  del scale, total
  return optax.exponential_decay(base, transition_steps=schedule.decay_epochs * steps_per_epoch,
                                 decay_rate=schedule.decay_factor, staircase=schedule.staircase)


SCHEDULES = {"piecewise": _piecewise, "cosine": _cosine, "exponential": _exponential}


def learning_rate_schedule(config, steps_per_epoch: int):
  """config.schedule's rate at each step, times `min(1, (step + 1) / warm-up steps)` during a
  linear warm-up. With `reference_batch` set, every rate scales by batch_size / reference_batch
  (linear scaling, Goyal et al., 2017)."""
  schedule = config.schedule
  scale = (config.input.batch_size / schedule.reference_batch if schedule.reference_batch
           else 1.0)
  rate = SCHEDULES[schedule.name](schedule, schedule.learning_rate * scale, scale,
                                  steps_per_epoch, config.num_epochs * steps_per_epoch)
  warmup = schedule.warmup_epochs * steps_per_epoch
  if not warmup:
    return rate
  return lambda step: rate(step) * jnp.minimum(1.0, (step + 1) / warmup)


def check_config(config) -> None:
  """Rejects a bad `config.optim` or `config.schedule` with the field and the fix."""
  optim, schedule = config.optim, config.schedule
  def require(ok, message):
    if not ok:
      raise errors.ConfigError(message)
  for group, field, registry in (("optim", "name", OPTIMIZERS), ("schedule", "name", SCHEDULES),
                                 ("optim", "decay", DECAY_STYLES)):
    value = config[group][field]
    require(value in registry or (field == "decay" and value is None),
            f"config.{group}.{field}={value!r}: expected one of {list(registry)}.")
  for name in ("momentum", "rms_decay", "b1", "b2"):
    require(0 <= optim[name] < 1, f"config.optim.{name}={optim[name]}: must be in [0, 1).")
  for name in ("weight_decay", "rms_initial"):
    require(optim[name] >= 0, f"config.optim.{name}={optim[name]}: must be >= 0.")
  for name in ("epsilon", "clip_norm"):
    require(optim[name] is None or optim[name] > 0,
            f"config.optim.{name}={optim[name]}: must be > 0 (or None: the default).")
  require(schedule.learning_rate > 0,
          f"config.schedule.learning_rate={schedule.learning_rate}: must be > 0.")
  require(schedule.reference_batch is None or schedule.reference_batch > 0,
          f"config.schedule.reference_batch={schedule.reference_batch}: must be > 0 (or None: "
          "rates as written).")
  require(0 <= schedule.warmup_epochs < config.num_epochs,
          f"config.schedule.warmup_epochs={schedule.warmup_epochs}: must be >= 0 and shorter "
          f"than the run (config.num_epochs={config.num_epochs}).")
  require(0 <= schedule.final_rate <= schedule.learning_rate,
          f"config.schedule.final_rate={schedule.final_rate}: must be in [0, "
          "config.schedule.learning_rate].")
  require(0 < schedule.decay_factor <= 1 and schedule.decay_epochs > 0,
          f"config.schedule.decay_factor={schedule.decay_factor}, config.schedule.decay_epochs="
          f"{schedule.decay_epochs}: need a factor in (0, 1] every positive number of epochs.")
  _check_piecewise(schedule, require)


def _check_piecewise(schedule, require) -> None:
  bounds, rates = list(schedule.boundaries), tuple(schedule.rates)
  require(len(bounds) == len(rates) and min(rates, default=1) > 0,
          f"config.schedule.boundaries={tuple(bounds)} and config.schedule.rates={rates} need "
          "the same length (the rate from each boundary on), and positive rates.")
  require(bounds == sorted(bounds) and len(set(bounds)) == len(bounds) and
          all(0 < b for b in bounds),
          f"config.schedule.boundaries={tuple(bounds)}: epochs must be positive and strictly "
          "increasing.")
