"""Convolutions as shifted slices: the fast formulation on XLA's CPU backend.

XLA's CPU backend runs convolutions through generic kernels that are slow for
this network: the depthwise 3x3 conv (`feature_group_count=C`) is 20-40x slower
than nine shifted multiply-adds, and a 1x1 convolution's backward pass is 2-5x
slower than the same matrix product. The depthwise conv has its own VJP: autodiff
of the nine multiply-adds keeps nine shifted copies of the input for the backward
pass and reduces each separately for the kernel gradient; the custom VJP keeps the
input alone and computes all nine kernel-gradient sums in one pass. The forward pass
pads first, so that the BatchNorm+ReLU before the conv fuses into the padded copy the
taps read; the backward pass reads the unpadded input (`_tap_windows`), which saves
a memory pass. (Read that way in the forward pass too, a conv bias before the
BatchNorm, as in the Keras layout, made XLA write each tap's product to memory
separately: a 1.2-1.3x slower train step; README, Speed.) GPUs and TPUs
have fast convolution kernels (cuDNN, the TPU's MXU), so there
`lax.conv_general_dilated` is used.

Both functions here have `lax.conv_general_dilated`'s signature and are handed to
`nn.Conv(conv_general_dilated=...)`, so every implementation keeps the very same
parameters (e.g. depthwise kernels `(3, 3, 1, C)`): checkpoints do not depend on it.
"""
import functools
import operator

import jax
import jax.numpy as jnp
from jax import lax

from mobilenet_jax import errors

IMPLEMENTATIONS = ("auto", "lax", "shifted")


def _pads_and_out_sizes(hw, kernel_hw, strides, padding):
  """`padding` ('SAME', 'VALID' or explicit pairs) as pairs, and the output's (height, width)."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(hw, kernel_hw, strides, padding)
  out_sizes = tuple((size + sum(pad) - k) // s + 1
                    for size, pad, k, s in zip(hw, padding, kernel_hw, strides))
  return padding, out_sizes


def _shifted_slices(x, kernel_hw, strides, padding):
  """Yields ((i, j), x_pad[:, i::sh, j::sw, :]) for each kernel tap, each of output size."""
  n, h, w, c = x.shape
  sh, sw = strides
  ((pt, pb), (pl, pr)), (ho, wo) = _pads_and_out_sizes((h, w), kernel_hw, strides, padding)
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      yield (i, j), lax.slice(x, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                              (1, sh, sw, 1))


def conv_shifted(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, precision=None,
                 preferred_element_type=None):
  """NHWC/HWIO convolution: depthwise as a sum of shifted products, dense as one matmul.

  Dense (`feature_group_count == 1`): the shifted slices are concatenated along
  channels (im2col) and multiplied by the kernel reshaped to `(kh * kw * C_in, C_out)`;
  for a 1x1 kernel that is a plain matrix product. Depthwise (`feature_group_count ==
  C_in`, kernel `(kh, kw, 1, C_in)`): the sum over taps of slice * kernel[i, j, 0].
  """
  del dimension_numbers, preferred_element_type  # NHWC/HWIO only, as nn.Conv passes.
  kh, kw, k_in, k_out = rhs.shape
  channels = lhs.shape[-1]
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    raise ValueError("conv_shifted does not support dilation.")
  if feature_group_count == 1:
    taps = _shifted_slices(lhs, (kh, kw), window_strides, padding)
    patches = jnp.concatenate([t for _, t in taps], axis=-1) if kh * kw > 1 else next(taps)[1]
    return jnp.dot(patches, rhs.reshape(kh * kw * k_in, k_out), precision=precision)
  if not (feature_group_count == channels == k_out and k_in == 1):
    raise ValueError("conv_shifted supports dense (feature_group_count=1) and depthwise "
                     f"(feature_group_count=C_in, kernel (kh, kw, 1, C_in)) convolutions, got "
                     f"kernel {rhs.shape}, input {lhs.shape}, "
                     f"feature_group_count={feature_group_count}.")
  return depthwise(lhs, rhs, tuple(window_strides), _hashable(padding))


def _hashable(padding):
  return padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)


def _tap_windows(x, kernel_hw, strides, padding):
  """Yields ((i, j), window, pads) per kernel tap, reading `x` without a padded copy.

  Output position o reads input o * stride + tap - pad_before; `window` is the
  strided slice of `x` for the outputs whose input is in bounds, and `pads` (for
  `lax.pad`) places its products in the output, zero elsewhere. XLA fuses those pads
  into the sum, so no padded copy of the activations is written, one memory pass
  less per depthwise conv than padding first.
  """
  n, h, w, c = x.shape
  padding, out_sizes = _pads_and_out_sizes((h, w), kernel_hw, strides, padding)

  def valid(size, out, tap, stride, pad_before):  # First input index, output range [lo, hi).
    lo = max(0, -((tap - pad_before) // stride))
    hi = min(out, (size - 1 + pad_before - tap) // stride + 1)
    return lo * stride + tap - pad_before, lo, hi

  for i in range(kernel_hw[0]):
    for j in range(kernel_hw[1]):
      (r0, rlo, rhi), (c0, clo, chi) = (
          valid(size, out, tap, s, pad[0])
          for size, out, tap, s, pad in zip((h, w), out_sizes, (i, j), strides, padding))
      if rhi <= rlo or chi <= clo:
        continue  # This tap only ever reads padding.
      sh, sw = strides
      window = lax.slice(x, (0, r0, c0, 0), (n, r0 + (rhi - rlo - 1) * sh + 1,
                                             c0 + (chi - clo - 1) * sw + 1, c), (1, sh, sw, 1))
      yield (i, j), window, ((0, 0, 0), (rlo, out_sizes[0] - rhi, 0),
                             (clo, out_sizes[1] - chi, 0), (0, 0, 0))


def _sum_of_taps(x, kernel, strides, padding):
  """Depthwise conv (kernel `(kh, kw, 1, C)`) as the sum over taps of slice * kernel[i, j, 0]."""
  return functools.reduce(operator.add, (
      tap * kernel[i, j, 0]
      for (i, j), tap in _shifted_slices(x, kernel.shape[:2], strides, padding)))


def _sum_of_windows(x, kernel, strides, padding):
  """`_sum_of_taps` from the unpadded input: each tap's products are padded into the sum.

  The backward pass differentiates this; the forward pass uses `_sum_of_taps`, since
  here the BatchNorm+ReLU before the conv can be recomputed for each of the nine taps.
  """
  zero = jnp.zeros((), x.dtype)
  return functools.reduce(operator.add, (
      lax.pad(window * kernel[i, j, 0], zero, pads)
      for (i, j), window, pads in _tap_windows(x, kernel.shape[:2], strides, padding)))


depthwise = jax.custom_vjp(_sum_of_taps, nondiff_argnums=(2, 3))


def _depthwise_fwd(x, kernel, strides, padding):
  return _sum_of_taps(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, g):
  """Input gradient by autodiff (slices and pads); kernel gradient in one variadic reduction.

  The kernel gradient of tap (i, j) is the sum over n, h, w of window_ij * g. One
  variadic reduce computes all taps from a single read of `x` and `g`: first over
  each image's rows (a large output XLA can spread over cores), then a small sum.
  """
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _sum_of_windows(x, kernel, strides, padding), x)
  n, ho, wo, c = g.shape
  zero = jnp.zeros((), jnp.float32)
  taps, products = [], []
  for tap, window, pads in _tap_windows(x, kernel.shape[:2], strides, padding):
    _, (top, bottom, _), (left, right, _), _ = pads
    g_window = g[:, top:ho - bottom, left:wo - right]
    products.append(lax.pad((window * g_window).astype(jnp.float32), zero, pads)
                    .reshape(n, ho, wo * c))
    taps.append(tap)
  per_image = lax.reduce(tuple(products), (zero,) * len(products),
                         lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
  grad_kernel = jnp.zeros(kernel.shape, jnp.float32)
  for (i, j), p in zip(taps, per_image):
    grad_kernel = grad_kernel.at[i, j, 0].set(p.reshape(n * wo, c).sum(0))
  return input_vjp(g)[0], grad_kernel.astype(kernel.dtype)


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def resolve(impl: str, backend: str | None = None) -> str:
  """Maps `auto` to the fast implementation for the backend: `shifted` on CPU, else `lax`."""
  if impl not in IMPLEMENTATIONS:
    raise errors.ConfigError(f"config.model.conv={impl!r}: expected one of {IMPLEMENTATIONS}.")
  if impl == "auto":
    return "shifted" if (backend or jax.default_backend()) == "cpu" else "lax"
  return impl


def conv_fn(impl: str):
  """The `conv_general_dilated` to hand to `nn.Conv` (None: lax's own)."""
  return conv_shifted if resolve(impl) == "shifted" else None
