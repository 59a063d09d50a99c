"""Image files and images of any size on the host: reading, fitting to the model's input, and
the random-resized crop. Training (image folders), evaluation and `predict` all read and fit
through here, so every path accepts the same formats and resizes the same way.

On-device preprocessing (normalization, augmentation, the resolution multiplier's resize) is
traced into the steps: `input_pipeline.py`.
"""
import math

import numpy as np

from mobilenet_jax import errors

# The formats read, by PIL's names ('MPO': the JPEG that many cameras write), and their files'
# extensions (image folders list only these).
FORMATS = ("JPEG", "MPO", "PNG", "BMP", "WEBP")
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Random-resized crop (Szegedy et al., 2015), as torchvision's RandomResizedCrop draws it.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def read(path: str) -> np.ndarray:
  """An RGB uint8 (h, w, 3) array from a JPEG, PNG, BMP or WebP file; else a FileError.

  Grayscale images are replicated to three channels and an alpha channel is dropped
  (transparent pixels keep their colour values), as the model only knows RGB.
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  expected = "JPEG, PNG, BMP or WebP expected"
  try:
    with Image.open(path) as image:
      if image.format not in FORMATS:
        raise errors.FileError(f"{path}: a {image.format} image; {expected}.")
      return np.asarray(image.convert("RGB"), np.uint8)
  except errors.FileError:
    raise
  except FileNotFoundError as e:
    raise errors.FileError(f"{path}: no such file.") from e
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise errors.FileError(f"{path}: not a readable image ({e}); {expected}.") from e


def centre_square(image: np.ndarray) -> np.ndarray:
  """The centred min(h, w)-sided square of an (h, w, c) image."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return image[top:top + side, left:left + side]


def fit(image: np.ndarray, config) -> np.ndarray:
  """An image of any size as `predict` feeds it to the model.

  With `config.eval.crop` None: its centre square, which the model's `resize` brings to
  image_size on device (as variable-size datasets are read). With a fraction (ImageNet's
  0.875): its shorter side resized to image_size / crop with `config.eval.resize`'s
  interpolation, then the centred image_size square, as timm evaluates.
  """
  if config.eval.crop is None:
    return centre_square(image)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  size = config.input.image_size
  h, w = image.shape[:2]
  short = int(size / config.eval.crop)
  scale = short / min(h, w)
  new_w, new_h = (short, round(h * scale)) if w <= h else (round(w * scale), short)
  method = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[config.eval.resize]
  resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), method))
  top, left = round((new_h - size) / 2), round((new_w - size) / 2)
  return resized[top:top + size, left:left + size]


def fit_to_input(image: np.ndarray, config) -> np.ndarray:
  """A file's image at image_size x image_size, as image folders are read: `fit`, with the
  centre square resized here when config.eval.crop is None."""
  image = fit(image, config)
  return resize(image, config.input.image_size) if config.eval.crop is None else image


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking, PIL's default) to `size` x `size`."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def inception_crop(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
  """A random crop of 8-100% of the area at aspect ratio 3/4-4/3, resized to `size` and
  mirrored with probability 1/2; after 10 failed draws, the centre crop of the closest
  ratio (torchvision's fallback)."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(*CROP_SCALE)
    ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < cw <= w and 0 < ch <= h:
      top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
      break
  else:
    ratio = min(max(w / h, CROP_RATIO[0]), CROP_RATIO[1])
    cw, ch = (w, round(w / ratio)) if w / h < ratio else (round(h * ratio), h)
    top, left = (h - ch) // 2, (w - cw) // 2
  out = resize(image[top:top + ch, left:left + cw], size)
  return out[:, ::-1] if rng.random() < 0.5 else out


def square_and_resize_tf(image, size: int):
  """A variable-size uint8 image (TensorFlow, while tfds reads) -> `size` x `size` uint8: its
  centre square (as `centre_square`), resized bilinearly, antialiased as on device
  (`input_pipeline.resize`), so aspect ratios are kept."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  side = tf.minimum(h, w)
  image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
  image = tf.image.resize(image, (size, size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
