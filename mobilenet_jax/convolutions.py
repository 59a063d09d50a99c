"""Convolutions as shifted slices: the fast formulation on XLA's CPU backend.

XLA's CPU backend runs convolutions through generic kernels that are slow for
this network: the depthwise 3x3 conv (`feature_group_count=C`) is 20-40x slower
than nine shifted multiply-adds, and a 1x1 convolution's backward pass is 2-5x
slower than the same matrix product. The depthwise conv has its own VJP: autodiff
of the nine multiply-adds keeps nine shifted copies of the input for the backward
pass and reduces each separately for the kernel gradient; the custom VJP keeps the
input alone and computes all nine kernel-gradient sums in one pass. The input is
padded once (a copy into which XLA fuses the BatchNorm+ReLU before the conv) and the
taps read that copy: forming each tap's product from the unpadded input and padding
it into the sum instead made XLA materialize the products one by one, recomputing the
BatchNorm+ReLU in each (train step 1.3x slower, README Speed). GPUs and TPUs
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

IMPLEMENTATIONS = ("auto", "lax", "shifted")


def _shifted_slices(x, kernel_hw, strides, padding):
  """Yields ((i, j), x_pad[:, i::sh, j::sw, :]) for each kernel tap, each of output size."""
  kh, kw = kernel_hw
  sh, sw = strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], kernel_hw, strides, padding)
  (pt, pb), (pl, pr) = padding
  n, h, w, c = x.shape
  ho, wo = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  for i in range(kh):
    for j in range(kw):
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


def _sum_of_taps(x, kernel, strides, padding):
  """Depthwise conv (kernel `(kh, kw, 1, C)`) as the sum over taps of slice * kernel[i, j, 0]."""
  return functools.reduce(operator.add, (
      tap * kernel[i, j, 0]
      for (i, j), tap in _shifted_slices(x, kernel.shape[:2], strides, padding)))


depthwise = jax.custom_vjp(_sum_of_taps, nondiff_argnums=(2, 3))


def _depthwise_fwd(x, kernel, strides, padding):
  return _sum_of_taps(x, kernel, strides, padding), (x, kernel)


def _depthwise_bwd(strides, padding, residuals, g):
  """Input gradient by autodiff (slices and pads); kernel gradient in one variadic reduction.

  The kernel gradient of tap (i, j) is the sum over n, h, w of slice_ij * g. One
  variadic reduce computes all taps from a single read of `x` and `g`: first over
  each image's rows (a large output XLA can spread over cores), then a small sum.
  """
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _sum_of_taps(x, kernel, strides, padding), x)
  n, ho, wo, c = g.shape
  products = tuple((tap * g).astype(jnp.float32).reshape(n, ho, wo * c)
                   for _, tap in _shifted_slices(x, kernel.shape[:2], strides, padding))
  per_image = lax.reduce(products, (jnp.float32(0),) * len(products),
                         lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
  grad_kernel = jnp.stack([p.reshape(n * wo, c).sum(0) for p in per_image]).reshape(kernel.shape)
  return input_vjp(g)[0], grad_kernel.astype(kernel.dtype)


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def resolve(impl: str, backend: str | None = None) -> str:
  """Maps `auto` to the fast implementation for the backend: `shifted` on CPU, else `lax`."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.conv={impl!r}: expected one of {IMPLEMENTATIONS}.")
  if impl == "auto":
    return "shifted" if (backend or jax.default_backend()) == "cpu" else "lax"
  return impl


def conv_fn(impl: str):
  """The `conv_general_dilated` to hand to `nn.Conv` (None: lax's own)."""
  return conv_shifted if resolve(impl) == "shifted" else None
