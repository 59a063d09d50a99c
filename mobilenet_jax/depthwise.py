"""Depthwise convolution implementations that share `nn.Conv`'s parameters.

XLA's CPU backend lowers a grouped convolution (`feature_group_count=C`) to a
slow generic loop: 20-40x slower than writing the same 3x3 depthwise conv as
nine shifted multiply-adds, which XLA fuses into a single elementwise loop.
GPUs and TPUs have fast grouped-conv kernels, so there the grouped form wins.

`depthwise_taps` has `lax.conv_general_dilated`'s signature and is passed to
`nn.Conv(conv_general_dilated=...)`, so both implementations keep the very same
parameter tree (kernel `(kh, kw, 1, C)`) and checkpoints do not depend on it.
"""

import jax
import jax.numpy as jnp
from jax import lax

IMPLEMENTATIONS = ("auto", "grouped", "taps")


def depthwise_taps(lhs, rhs, window_strides, padding, lhs_dilation=None,
                   rhs_dilation=None, dimension_numbers=None,
                   feature_group_count=1, precision=None,
                   preferred_element_type=None):
  """Depthwise NHWC/HWIO convolution as a sum of strided, shifted products."""
  del dimension_numbers, precision, preferred_element_type  # NHWC/HWIO only.
  kh, kw, one, channels = rhs.shape
  if one != 1 or feature_group_count != lhs.shape[-1] or channels != lhs.shape[-1]:
    raise ValueError(
        "depthwise_taps computes only depthwise convolutions: kernel "
        f"(kh, kw, 1, C) with feature_group_count == C, got kernel {rhs.shape}, "
        f"input {lhs.shape}, feature_group_count={feature_group_count}.")
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    raise ValueError("depthwise_taps does not support dilation.")
  sh, sw = window_strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides, padding)
  (pt, pb), (pl, pr) = padding
  n, h, w, c = lhs.shape
  ho = (h + pt + pb - kh) // sh + 1
  wo = (w + pl + pr - kw) // sw + 1
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      tap = lax.slice(x, (0, i, j, 0),
                      (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1))
      term = tap * rhs[i, j, 0]
      out = term if out is None else out + term
  return out


def resolve(impl: str, backend: str | None = None) -> str:
  """Maps `auto` to the fast implementation for the backend: taps on CPU."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.depthwise={impl!r}: expected one of "
                     f"{IMPLEMENTATIONS}.")
  if impl == "auto":
    return "taps" if (backend or jax.default_backend()) == "cpu" else "grouped"
  return impl


def conv_fn(impl: str):
  """The `conv_general_dilated` to hand to `nn.Conv` (None = lax's own)."""
  return depthwise_taps if resolve(impl) == "taps" else None
