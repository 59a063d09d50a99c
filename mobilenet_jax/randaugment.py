"""RandAugment (Cubuk et al., 2019) on device, as timm's `rand_augment_transform` applies it.

`config.augment.randaugment` takes timm's string (its `--aa`): 'rand-m9-mstd0.5-inc1' is 2 ops
per image (n2, the default), each applied with probability 0.5 (p0.5), at magnitude 9 of 10
(m9) plus normal noise of std 0.5 per op (mstd0.5; mstd above 100: uniform in [0, m]), clipped
to [0, 10] (mmax10), from the 'increasing' op set (inc1: every op grows stronger with the
magnitude; inc0, the default, is the original set, whose posterize, solarize and enhance ops
weaken or go both ways). The ops, their order and magnitude scales are timm's
(`_RAND_TRANSFORMS`, `LEVEL_TO_ARG`); rotate, shear and translate negate their argument with
probability 1/2 and fill uncovered pixels with the mean colour (timm's `img_mean`).

Each op is written once, here, on one uint8 image, to equal PIL's (which timm calls) within
rounding: a point table for the pixel ops, PIL's blend (`ImageEnhance`) for the enhance ops,
PIL's affine transform with bilinear sampling for the geometric ones (timm picks bilinear or
bicubic at random by default; here always bilinear, as timm's `--train-interpolation
bilinear`). Which op, whether it applies, its magnitude and sign are the sampler's draws
(`sampler.randaugment_draws`), per image and layer.
"""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp

from mobilenet_jax import errors

LEVEL_DENOM = 10.0  # timm's: magnitude 10 is each op's full strength.
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class Policy:
  """A parsed timm RandAugment string."""
  layers: int = 2
  magnitude: float = 10.0
  prob: float = 0.5
  magnitude_std: float = 0.0
  magnitude_max: float = 10.0
  increasing: bool = False

  @property
  def ops(self) -> tuple[str, ...]:
    return INCREASING_OPS if self.increasing else OPS


_SECTIONS = {"m": ("magnitude", float), "n": ("layers", int), "p": ("prob", float),
             "mstd": ("magnitude_std", float), "mmax": ("magnitude_max", float),
             "inc": ("increasing", lambda v: bool(int(v)))}


def parse(spec: str) -> Policy | None:
  """timm's RandAugment string -> Policy; '' -> None (off)."""
  if not spec:
    return None
  usage = (f"config.augment.randaugment={spec!r}: expected timm's RandAugment string, 'rand' "
           "then any of -mM (magnitude, 0-10), -nN (ops per image), -pP (probability of each), "
           "-mstdS, -mmaxM, -incB, e.g. 'rand-m9-mstd0.5-inc1' (or '' for none)")
  sections = spec.split("-")
  if sections[0] != "rand":
    raise errors.ConfigError(usage + ".")
  fields = {}
  for section in sections[1:]:
    match = re.fullmatch(r"([a-z]+)(\d.*)", section)
    if not match or match.group(1) not in _SECTIONS:
      raise errors.ConfigError(f"{usage}; {section!r} is none of these.")
    name, convert = _SECTIONS[match.group(1)]
    try:
      fields[name] = convert(match.group(2))
    except ValueError as e:
      raise errors.ConfigError(f"{usage}; {section!r} has no number.") from e
  policy = Policy(**fields)
  if policy.magnitude_std > 100:
    policy = dataclasses.replace(policy, magnitude_std=math.inf)
  if policy.layers < 1 or not 0 <= policy.prob <= 1 or policy.magnitude < 0:
    raise errors.ConfigError(f"{usage}; n must be >= 1, p in [0, 1] and m >= 0.")
  return policy


# ---- The ops: (uint8 image (h, w, 3), magnitude, negate, fill) -> uint8 image. ----

def _level(magnitude):
  return magnitude / LEVEL_DENOM


def _signed(value, negate):
  return jnp.where(negate, -value, value)


def _to_uint8(x):
  """PIL's cast of a blended or filtered value: clipped to [0, 255], then truncated."""
  return jnp.floor(jnp.clip(x, 0, 255)).astype(jnp.uint8)


def _blend(degenerate, image, factor):
  """PIL's Image.blend(degenerate, image, factor) (ImageEnhance), in float32 as PIL computes it."""
  degenerate = degenerate.astype(jnp.float32)
  return _to_uint8(degenerate + factor * (image.astype(jnp.float32) - degenerate))


def _grey(image):
  """PIL's RGB -> L conversion (ITU-R 601-2 luma in 16-bit fixed point), as int32."""
  rgb = image.astype(jnp.int32)
  return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16


def _enhance_factor(magnitude, negate, increasing: bool):
  """timm's enhance levels: 0.1-1.9 rising with the magnitude, or ('increasing') 1 +- 0.9 *
  level, at least 0.1."""
  if increasing:
    return jnp.maximum(0.1, 1.0 + _signed(_level(magnitude) * 0.9, negate))
  return _level(magnitude) * 1.8 + 0.1


def auto_contrast(image, *_):
  """Each channel stretched linearly from its [min, max] to [0, 255] (ImageOps.autocontrast)."""
  x = image.astype(jnp.int32)
  low, high = x.min((0, 1)), x.max((0, 1))
  stretched = (x - low) * 255 // jnp.maximum(high - low, 1)
  return jnp.where(high > low, stretched, x).astype(jnp.uint8)


def _equalize_channel(channel):
  histogram = jnp.bincount(channel.reshape(-1), length=256)
  last = histogram[255 - jnp.argmax(histogram[::-1] > 0)]  # The highest value's count.
  step = (histogram.sum() - last) // 255
  below = jnp.cumsum(histogram) - histogram  # Pixels under each value.
  table = jnp.minimum((step // 2 + below) // jnp.maximum(step, 1), 255)
  keep = ((histogram > 0).sum() <= 1) | (step == 0)
  return jnp.where(keep, channel, table[channel])


def equalize(image, *_):
  """Each channel's histogram equalized as ImageOps.equalize does it."""
  x = image.astype(jnp.int32)
  return jnp.stack([_equalize_channel(x[..., c]) for c in range(3)], -1).astype(jnp.uint8)


def invert(image, *_):
  return 255 - image


def posterize(image, magnitude, negate, fill, increasing: bool = False):
  """Keeps the top 0-4 bits: int(4 * level), or 4 minus that when increasing. 0 bits (the
  original op below magnitude 2.5) give black, as TensorFlow's op does; PIL 13 refuses them."""
  del negate, fill
  bits = (_level(magnitude) * 4).astype(jnp.int32)
  bits = 4 - bits if increasing else bits
  mask = (0xFF << (8 - bits)) & 0xFF
  return (image.astype(jnp.int32) & mask).astype(jnp.uint8)


def solarize(image, magnitude, negate, fill, increasing: bool = False):
  """Inverts the values at or above a threshold of int(256 * level) (256 minus that when
  increasing)."""
  del negate, fill
  threshold = jnp.minimum(256, (_level(magnitude) * 256).astype(jnp.int32))
  threshold = 256 - threshold if increasing else threshold
  x = image.astype(jnp.int32)
  return jnp.where(x < threshold, x, 255 - x).astype(jnp.uint8)


def solarize_add(image, magnitude, *_):
  """Adds int(110 * level) to the values under 128, capped at 255."""
  add = jnp.minimum(128, (_level(magnitude) * 110).astype(jnp.int32))
  x = image.astype(jnp.int32)
  return jnp.where(x < 128, jnp.minimum(255, x + add), x).astype(jnp.uint8)


def color(image, magnitude, negate, fill, increasing: bool = False):
  """Saturation: blended with its grey version (ImageEnhance.Color)."""
  del fill
  grey = jnp.repeat(_grey(image)[..., None], 3, -1)
  return _blend(grey, image, _enhance_factor(magnitude, negate, increasing))


def contrast(image, magnitude, negate, fill, increasing: bool = False):
  """Blended with the grey of its mean luma (ImageEnhance.Contrast)."""
  del fill
  mean = jnp.floor(_grey(image).astype(jnp.float32).mean() + 0.5)
  return _blend(jnp.full(image.shape, mean), image, _enhance_factor(magnitude, negate, increasing))


def brightness(image, magnitude, negate, fill, increasing: bool = False):
  """Blended with black (ImageEnhance.Brightness)."""
  del fill
  return _blend(jnp.zeros(image.shape), image, _enhance_factor(magnitude, negate, increasing))


def sharpness(image, magnitude, negate, fill, increasing: bool = False):
  """Blended with PIL's SMOOTH filter of it (3x3, centre 5 of 13; the border pixels kept), so a
  factor above 1 sharpens (ImageEnhance.Sharpness)."""
  del fill
  x = image.astype(jnp.float32)
  kernel = jnp.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13
  h, w = x.shape[:2]
  smooth = sum(kernel[i, j] * x[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
  smooth = jnp.floor(jnp.clip(smooth + 0.5, 0, 255))
  degenerate = x.at[1:-1, 1:-1].set(smooth)
  return _blend(degenerate, image, _enhance_factor(magnitude, negate, increasing))


def _affine(image, matrix, fill):
  """PIL's Image.transform(AFFINE, matrix, BILINEAR, fillcolor=fill): output pixel (x, y)
  samples the input at matrix @ (x + 0.5, y + 0.5, 1), bilinearly between pixel centres
  (edge pixels repeated), and takes `fill` where that point is outside the image."""
  a, b, c, d, e, f = matrix
  h, w = image.shape[:2]
  y_out, x_out = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
  x_in, y_in = a * x_out + b * y_out + c, d * x_out + e * y_out + f
  inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
  x_in, y_in = x_in - 0.5, y_in - 0.5
  x0, y0 = jnp.floor(x_in), jnp.floor(y_in)
  dx, dy = (x_in - x0)[..., None], (y_in - y0)[..., None]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  pixels = image.astype(jnp.float32)

  def row(y):
    y = jnp.clip(y, 0, h - 1)
    left, right = pixels[y, jnp.clip(x0, 0, w - 1)], pixels[y, jnp.clip(x0 + 1, 0, w - 1)]
    return left + (right - left) * dx

  top = row(y0)
  bottom = jnp.where(((y0 + 1 >= 0) & (y0 + 1 < h))[..., None], row(y0 + 1), top)
  sampled = jnp.floor(top + (bottom - top) * dy)
  return jnp.where(inside[..., None], sampled, fill).astype(jnp.uint8)


def rotate(image, magnitude, negate, fill):
  """Rotated by up to 30 degrees about the centre (PIL's Image.rotate)."""
  angle = -jnp.deg2rad(_signed(_level(magnitude) * 30.0, negate))
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  h, w = image.shape[:2]
  cx, cy = w / 2, h / 2
  matrix = (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)
  return _affine(image, matrix, fill)


def shear_x(image, magnitude, negate, fill):
  return _affine(image, (1, _signed(_level(magnitude) * 0.3, negate), 0, 0, 1, 0), fill)


def shear_y(image, magnitude, negate, fill):
  return _affine(image, (1, 0, 0, _signed(_level(magnitude) * 0.3, negate), 1, 0), fill)


def translate_x(image, magnitude, negate, fill):
  """Shifted by up to 45% of its width."""
  pixels = _signed(_level(magnitude) * 0.45, negate) * image.shape[1]
  return _affine(image, (1, 0, pixels, 0, 1, 0), fill)


def translate_y(image, magnitude, negate, fill):
  pixels = _signed(_level(magnitude) * 0.45, negate) * image.shape[0]
  return _affine(image, (1, 0, 0, 0, 1, pixels), fill)


def _increasing(op):
  return lambda *args: op(*args, increasing=True)


OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
INCREASING_OPS = tuple(f"{name}Increasing" if name in (
    "Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness") else name
                       for name in OPS)
FUNCTIONS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
    "Posterize": posterize, "Solarize": solarize, "SolarizeAdd": solarize_add, "Color": color,
    "Contrast": contrast, "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x,
    "ShearY": shear_y, "TranslateXRel": translate_x, "TranslateYRel": translate_y,
    **{f"{name}Increasing": _increasing(op) for name, op in (
        ("Posterize", posterize), ("Solarize", solarize), ("Color", color),
        ("Contrast", contrast), ("Brightness", brightness), ("Sharpness", sharpness))},
}


def apply(images, draws, policy: Policy, fill):
  """Each uint8 image through its drawn ops (`draws['randaugment_*']`, one per layer), in turn."""
  branches = [FUNCTIONS[name] for name in policy.ops]

  def one(image, op, applied, magnitude, negate):
    for layer in range(policy.layers):
      changed = jax.lax.switch(op[layer], branches, image, magnitude[layer], negate[layer], fill)
      image = jnp.where(applied[layer], changed, image)
    return image

  return jax.vmap(one)(images, draws["randaugment_op"], draws["randaugment_applied"],
                       draws["randaugment_magnitude"], draws["randaugment_negate"])
