"""MobileNetV1 (Howard et al. 2017) in Flax Linen, with the CIFAR layouts of the references.

Widths follow the paper's Table 1; `alpha` is its width multiplier. The
resolution multiplier is the input size (`config.input.image_size`): the network is
fully convolutional up to the global average pool, so any size works.

- Keras CIFAR reference: `stem_stride=2, use_bias=True` (optionally `shallow`), TensorFlow's
  'same' padding, Keras' BatchNorm defaults (decay 0.99, epsilon 1e-3).
- PyTorch CIFAR reference: `stem_stride=1, use_bias=False` (3,217,226 params), symmetric padding,
  PyTorch's BatchNorm defaults (decay 0.9, epsilon 1e-5).
- ImageNet (paper): `stem_stride=2, use_bias=False, num_classes=1000`, 224x224; Keras
  applications' checkpoints add ReLU6, TensorFlow padding and Keras' BatchNorm, timm's ReLU6 and
  PyTorch's padding and BatchNorm (`configs/imagenet.py`).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mobilenet_jax import convolutions, errors

# (output channels, stride) of the 13 depthwise-separable blocks.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),
          (1024, 2), (1024, 1))
SHALLOW_DROPPED = range(6, 11)  # The five 512-wide stride-1 blocks.

# Conv kernel initializers (the dense head keeps Flax's default). BatchNorm follows every
# conv, so a kernel's scale sets its effective learning rate (the gradient scales as 1/|w|, the
# update's relative size as lr/|w|^2), and weight decay takes ~1/(lr * wd) steps to forget
# it: the choice shows in short schedules.
KERNEL_INITS = {
    # Keras' he_normal (the Keras recipe): truncated normal, variance 2 / fan_in.
    "he_normal": nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
    # PyTorch's default (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)), variance 1 / (3 fan_in).
    "torch": nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
}

ModuleDef = Any


# How a convolution pads: TensorFlow's (and Keras') 'same' pads a stride-2 conv on an even size
# by 0 before and 1 after; PyTorch's `padding=1` pads 1 on both sides. Same output shapes.
PADDINGS = ("same", "symmetric")
ACTIVATIONS = {"relu": nn.relu, "relu6": nn.relu6}  # relu6: Keras applications' MobileNet.


def conv_and_norm(train: bool, use_bias: bool = False, kernel_init: str = "he_normal",
                  conv_impl: str = "auto", dtype: Any = jnp.float32,
                  axis_name: str | None = None, bn_momentum: float = 0.9,
                  bn_epsilon: float = 1e-5) -> tuple[ModuleDef, ModuleDef]:
  """`nn.Conv` and `nn.BatchNorm` with the settings every layer shares bound.

  `bn_momentum` is the running averages' decay: Keras' `momentum` (0.99 by default),
  1 - PyTorch's `momentum` (0.1 by default, so 0.9).
  """
  conv = functools.partial(nn.Conv, use_bias=use_bias, kernel_init=KERNEL_INITS[kernel_init],
                           dtype=dtype, conv_general_dilated=convolutions.conv_fn(conv_impl))
  norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=bn_momentum,
                           epsilon=bn_epsilon, dtype=dtype, axis_name=axis_name)
  return conv, norm


class ConvBNReLU(nn.Module):
  """Convolution -> BatchNorm -> ReLU, the unit every layer of MobileNetV1 is built from."""
  features: int
  kernel_size: int
  conv: ModuleDef  # nn.Conv with the model's bias, init, dtype and implementation bound.
  norm: ModuleDef  # nn.BatchNorm with the model's train/eval mode, dtype and pmap axis bound.
  strides: int = 1
  groups: int = 1
  padding: str = "symmetric"  # One of PADDINGS.
  activation: str = "relu"  # A key of ACTIVATIONS.

  @nn.compact
  def __call__(self, x):
    pad = self.kernel_size // 2
    padding = "SAME" if self.padding == "same" else ((pad, pad), (pad, pad))
    x = self.conv(self.features, (self.kernel_size,) * 2, strides=self.strides,
                  padding=padding, feature_group_count=self.groups, name="conv")(x)
    return ACTIVATIONS[self.activation](self.norm(name="bn")(x))


class DepthwiseSeparable(nn.Module):
  """Depthwise 3x3 conv, BN, ReLU, then pointwise 1x1 conv, BN, ReLU (paper Fig. 3)."""
  features: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  padding: str = "symmetric"
  activation: str = "relu"

  @nn.compact
  def __call__(self, x):
    unit = functools.partial(ConvBNReLU, conv=self.conv, norm=self.norm, padding=self.padding,
                             activation=self.activation)
    channels = x.shape[-1]
    x = unit(channels, 3, strides=self.strides, groups=channels, name="depthwise")(x)
    return unit(self.features, 1, name="pointwise")(x)


class Dropout(nn.Module):
  """flax's `nn.Dropout` (the same key, the same mask) for a batch split over a pmap axis: each
  device draws the mask of the whole global batch and keeps its own rows, so that every
  example's mask is the one a single device would draw, whatever the device count."""
  rate: float
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool):
    if not train or self.rate == 0:
      return x
    rows, first = x.shape[0], 0
    if self.axis_name is not None:
      first = jax.lax.axis_index(self.axis_name) * rows
      rows *= jax.lax.psum(1, self.axis_name)
    keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.rate, (rows, *x.shape[1:]))
    keep = jax.lax.dynamic_slice_in_dim(keep, first, x.shape[0])
    return jnp.where(keep, x / (1 - self.rate), 0)


class MobileNetV1(nn.Module):
  """MobileNetV1 classifier; `__call__(x, train)` takes NHWC images of any size."""
  num_classes: int = 10
  alpha: float = 1.0
  stem_stride: int = 2
  shallow: bool = False
  use_bias: bool = False
  kernel_init: str = "he_normal"
  conv_impl: str = "auto"
  dtype: Any = jnp.float32
  axis_name: str | None = None  # Synchronizes BatchNorm statistics under pmap.
  padding: str = "same"
  activation: str = "relu"
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dropout: float = 0.0  # Before the head, in training only (Keras applications: 1e-3).

  @nn.compact
  def __call__(self, x, train: bool):
    width = lambda c: max(1, int(c * self.alpha))
    conv, norm = conv_and_norm(train, self.use_bias, self.kernel_init, self.conv_impl,
                               self.dtype, self.axis_name, self.bn_momentum, self.bn_epsilon)
    layout = {"padding": self.padding, "activation": self.activation}
    x = ConvBNReLU(width(32), 3, conv, norm, strides=self.stem_stride, name="stem",
                   **layout)(x.astype(self.dtype))
    for i, (features, strides) in enumerate(BLOCKS):
      if self.shallow and i in SHALLOW_DROPPED:
        continue
      x = DepthwiseSeparable(width(features), conv, norm, strides, name=f"block{i + 1}",
                             **layout)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = Dropout(self.dropout, self.axis_name)(x, train)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return x.astype(jnp.float32)


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def largest_activation_bytes(model_config, image_size: int) -> int:
  """Bytes per image of the network's largest activation: block 1's output (64 * alpha channels
  at the stem's resolution; every later stride halves the side and at most doubles the width)."""
  side = -(-image_size // model_config.stem_stride)
  channels = max(1, int(BLOCKS[0][0] * model_config.alpha))
  return side * side * channels * jnp.dtype(DTYPES[model_config.dtype]).itemsize


def check_config(model_config) -> None:
  """Rejects a bad `config.model` with the flag and the fix, before anything is built."""
  if model_config.alpha <= 0:
    raise errors.ConfigError(f"config.model.alpha={model_config.alpha}: must be > 0.")
  if model_config.dtype not in DTYPES:
    raise errors.ConfigError(
        f"config.model.dtype={model_config.dtype!r}: expected one of {list(DTYPES)}.")
  if model_config.kernel_init not in KERNEL_INITS:
    raise errors.ConfigError(
        f"config.model.kernel_init={model_config.kernel_init!r}: expected one of "
        f"{list(KERNEL_INITS)}.")
  if model_config.stem_stride not in (1, 2):
    raise errors.ConfigError(
        f"config.model.stem_stride={model_config.stem_stride}: must be 1 or 2.")
  if model_config.padding not in PADDINGS:
    raise errors.ConfigError(
        f"config.model.padding={model_config.padding!r}: expected one of "
        f"{PADDINGS} ('same': Keras/TensorFlow, 'symmetric': PyTorch).")
  if model_config.activation not in ACTIVATIONS:
    raise errors.ConfigError(
        f"config.model.activation={model_config.activation!r}: expected one of "
        f"{list(ACTIVATIONS)}.")
  if not (0 <= model_config.bn_momentum < 1 and model_config.bn_epsilon > 0):
    raise errors.ConfigError(
        f"config.model.bn_momentum={model_config.bn_momentum}, "
        f"config.model.bn_epsilon={model_config.bn_epsilon}: need a decay in [0, 1) "
        "and a positive epsilon (Keras: 0.99, 1e-3; PyTorch: 0.9, 1e-5).")
  if not 0 <= model_config.dropout < 1:
    raise errors.ConfigError(f"config.model.dropout={model_config.dropout}: must be in [0, 1).")
  convolutions.resolve(model_config.conv)


def create_model(model_config, axis_name: str | None = None) -> MobileNetV1:
  """Builds the model from `config.model` (alpha, stem_stride, shallow, use_bias, ...)."""
  check_config(model_config)
  return MobileNetV1(num_classes=model_config.num_classes, alpha=model_config.alpha,
                     stem_stride=model_config.stem_stride, shallow=model_config.shallow,
                     use_bias=model_config.use_bias, kernel_init=model_config.kernel_init,
                     conv_impl=model_config.conv,
                     dtype=DTYPES[model_config.dtype], axis_name=axis_name,
                     padding=model_config.padding, activation=model_config.activation,
                     bn_momentum=model_config.bn_momentum, bn_epsilon=model_config.bn_epsilon,
                     dropout=model_config.dropout)


# The initializers are threefry key derivations and random draws, one unrolled program per
# parameter: LLVM's default -O2 spends half its time on them vectorizing and unrolling, which gives
# the same numbers (tests/test_models.py checks each bit) at twice the compile time.
_CPU_INIT_COMPILE = {"xla_backend_optimization_level": 1}


def init_variables(model, rng, image_size: int) -> dict:
  """{'params', 'batch_stats'} of `model` for square images of `image_size`, initialized in one
  compiled program (op by op, a full-size network's initializers take ~14 s on a CPU; compiled
  at -O1 there, ~2 s)."""
  options = _CPU_INIT_COMPILE if jax.default_backend() == "cpu" else None
  return jax.jit(model.init, static_argnames="train", compiler_options=options)(
      rng, jnp.zeros((1, image_size, image_size, 3)), train=False)
