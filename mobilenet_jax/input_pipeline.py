"""tfds image datasets held in accelerator memory, preprocessed inside the jitted step.

The whole dataset is read once (as uint8 RGB) and placed on the devices; every
per-step operation (shuffle, gather, augmentation, normalization, resize) is a
JAX function that the train step compiles in, so a steady-state training step
transfers nothing between host and device. Datasets whose images vary in size
(e.g. tf_flowers) are brought to `image_size` once, on the host, while reading.

Which examples each step trains on, and their augmentation draws, are the sampler's
(`sampler.py`); the functions at the end apply the draws.

Evaluation pads the split to whole batches and masks the padding, so every test
example is counted exactly once whatever the batch size and device count.
"""
import dataclasses
import os
import socket
import urllib.parse

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mobilenet_jax import errors, images, multihost, randaugment

# "inception": the random-resized crop and flip, on the host (streamed image files only).
AUGMENT_MODES = ("none", "crop", "flip", "crop+flip", "inception")
ERASE_MODES = ("const", "rand", "pixel")  # timm's --remode.
MIN_IMAGE_SIZE = 8


class DatasetUnavailableError(errors.UserError, RuntimeError):
  """The dataset is neither prepared in data_dir nor downloadable."""


class UnknownSplitError(errors.UserError, ValueError):
  """config.data.train_split or config.data.eval_split names no split of the dataset."""


@dataclasses.dataclass(frozen=True)
class Split:
  """A split in host memory; as a streamed source (`streaming.py`), its images fixed-size."""
  images: np.ndarray  # (n, h, w, c) uint8
  labels: np.ndarray  # (n,) int32
  fixed_size = True

  def __len__(self):
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: Split
  test: Split
  num_classes: int
  label_names: tuple[str, ...]


def check_config(config, num_devices: int) -> None:
  """Rejects bad `config.input` and `config.augment` settings before anything is loaded."""
  inputs, augment = config.input, config.augment
  if augment.name not in AUGMENT_MODES:
    raise errors.ConfigError(
        f"config.augment.name={augment.name!r}: expected one of {AUGMENT_MODES}.")
  if inputs.image_size < MIN_IMAGE_SIZE:
    raise errors.ConfigError(
        f"config.input.image_size={inputs.image_size}: must be >= "
        f"{MIN_IMAGE_SIZE} (MobileNetV1 downsamples by 16 or 32).")
  if inputs.batch_size <= 0 or inputs.batch_size % num_devices:
    processes = f" of {jax.process_count()} processes" if jax.process_count() > 1 else ""
    raise errors.ConfigError(
        f"config.input.batch_size={inputs.batch_size} must be a positive multiple of the "
        f"{num_devices} devices{processes}; use e.g. --config.input.batch_size="
        f"{max(1, round(inputs.batch_size / num_devices)) * num_devices}.")
  if augment.alternate_flips and "flip" not in augment.name:
    raise errors.ConfigError(
        f"config.augment.alternate_flips=True with config.augment.name="
        f"{augment.name!r}: there are no flips to alternate; use "
        "--config.augment.name=crop+flip (or flip), or "
        "--config.augment.alternate_flips=False.")
  if augment.cutout < 0:
    raise errors.ConfigError(
        f"config.augment.cutout={augment.cutout}: expected the side in pixels of "
        "the square to erase (e.g. 8), or 0 for no cutout.")
  _check_regularizers(augment)
  if len(inputs.mean) != 3 or len(inputs.std) != 3 or min(inputs.std) <= 0:
    raise errors.ConfigError(
        f"config.input.mean={inputs.mean} / config.input.std={inputs.std}: need one "
        "mean and one positive std per RGB channel (grayscale images are read as "
        "RGB).")


def _check_regularizers(augment) -> None:
  """Random erasing and RandAugment (their draws: `sampler.py`; Mixup and CutMix: `mixing.py`)."""
  def require(ok, field, expected):
    if not ok:
      raise errors.ConfigError(f"config.augment.{field}={augment[field]!r}: {expected}.")
  require(0 <= augment.erase_prob <= 1, "erase_prob", "must be a probability, in [0, 1]")
  require(augment.erase_mode in ERASE_MODES, "erase_mode", f"expected one of {ERASE_MODES}")
  randaugment.parse(augment.randaugment)  # Raises on a bad string.


def _data_dir(config):
  return config.data.dir or os.environ.get("TFDS_DATA_DIR") or None


def _builder(config):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(config.data.name, data_dir=_data_dir(config))
  except tfds.core.DatasetNotFoundError as e:
    raise errors.ConfigError(
        f"config.data.name={config.data.name!r} is not a tensorflow-datasets name "
        "(e.g. 'cifar10', 'cifar100').") from e
  features = builder.info.features
  if "image" not in features or "label" not in features or len(
      features["image"].shape) != 3:
    raise errors.ConfigError(
        f"config.data.name={config.data.name!r} is not an image classification "
        f"dataset with 'image' and 'label' features (it has {list(features)}).")
  return builder


def _unavailable(config, cause) -> DatasetUnavailableError:
  searched = _data_dir(config) or "tfds' default folder (~/tensorflow_datasets)"
  if config.data.name.startswith("imagenet"):  # No download: its licence needs an account.
    return DatasetUnavailableError(
        f"Dataset {config.data.name!r} is not prepared in {searched} ({cause}), and ImageNet "
        "must be downloaded by hand: follow the steps in configs/imagenet.py's docstring, then "
        "pass --config.data.name=folder:/path/to/imagenet.")
  return DatasetUnavailableError(
      f"Dataset {config.data.name!r} is not prepared in {searched} ({cause}): point "
      "--config.data.dir (or $TFDS_DATA_DIR) at a folder that holds a prepared tfds "
      f"{config.data.name!r}, or run once with internet access and --config.data.download=True.")


def _download_host(builder):
  """The host tfds would download the dataset from, if its checksums name one."""
  urls = list(builder.url_infos or {})
  return urllib.parse.urlparse(urls[0]).hostname if urls else None


def _reachable(host: str, timeout_s: float = 5.0) -> bool:
  try:
    socket.create_connection((host, 443), timeout=timeout_s).close()
    return True
  except OSError:
    return False


def _prepare(config, builder) -> None:
  """Downloads and prepares a missing dataset, or fails within seconds offline, before tfds'
  retries (minutes) and before it leaves partial downloads in the data dir."""
  if not config.data.download or builder.is_prepared():
    return  # Reading it says whether it is there.
  host = _download_host(builder)
  if host and not _reachable(host):
    raise _unavailable(config, f"and {host}, where tfds downloads it from, cannot be reached")
  try:
    builder.download_and_prepare()
  except Exception as e:  # Download failures come in many types (HTTP, DNS, checksum).
    raise _unavailable(config, f"and downloading it failed: {multihost.first_line(e)}") from e


def load(config) -> Dataset:
  """Reads the train and eval splits into host memory as uint8 RGB images and int32 labels."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TensorFlow only reads files here.
  builder = _builder(config)
  _prepare(config, builder)
  try:
    train = _read_split(config, builder, "train_split", config.data.train_examples)
    test = _read_split(config, builder, "eval_split", config.data.eval_examples)
  except (AssertionError, OSError, tfds.core.DatasetNotFoundError) as e:
    cause = ("and config.data.download=False" if not config.data.download else
             multihost.first_line(e))
    raise _unavailable(config, cause) from e
  _warn_if_normalization_is_off(config, train.images)
  label = builder.info.features["label"]
  return Dataset(train, test, label.num_classes, tuple(label.names))


def _read_split(config, builder, flag: str, limit) -> Split:
  """The split `config.data[flag]` (tfds syntax: 'test', 'train[:90%]'), its first `limit`
  examples."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    ds = tfds.load(config.data.name, split=config.data[flag], data_dir=_data_dir(config),
                   download=False)
  except ValueError as e:
    if "split" not in str(e).lower():
      raise
    raise UnknownSplitError(
        f"config.data.{flag}={config.data[flag]!r}: {e} A dataset without a test split can hold "
        "out part of its training split: --config.data.train_split='train[:90%]' "
        "--config.data.eval_split='train[90%:]'.") from e
  if limit is not None:
    ds = ds.take(limit)
  shape = builder.info.features["image"].shape

  def rgb_at_fixed_size(example):
    image = example["image"]
    if shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    if None in shape[:2]:
      image = images.square_and_resize_tf(image, config.input.image_size)
    return image, example["label"]

  ds = ds.map(rgb_at_fixed_size, num_parallel_calls=tf.data.AUTOTUNE)
  parts = list(tfds.as_numpy(ds.batch(10_000)))
  return Split(np.concatenate([p[0] for p in parts]),
               np.concatenate([p[1] for p in parts]).astype(np.int32))


def _warn_if_normalization_is_off(config, images) -> None:
  """Logs the training images' own mean and std when config.input.mean/std are far from them (the
  defaults are CIFAR-10's): BatchNorm copes, but the first layer sees skewed inputs."""
  every = max(1, images.shape[1] // 32)  # About 1000 images' 32x32 grids of pixels suffice.
  sample = images[:1000, ::every, ::every].reshape(-1, images.shape[-1]).astype(np.float32)
  mean, std = sample.mean(0), np.maximum(sample.std(0), 1.0)
  mean_off = np.abs(mean - np.asarray(config.input.mean)) / std
  std_off = np.abs(np.log(std / np.asarray(config.input.std)))
  if max(mean_off.max(), std_off.max()) > 0.25:
    fmt = lambda v: "(" + ", ".join(f"{x:.1f}" for x in v) + ")"
    logging.warning("config.input.mean=%s, config.input.std=%s, but %s's training images have "
                    "mean %s and std %s per channel: pass --config.input.mean='%s' "
                    "--config.input.std='%s' to normalize them.",
                    config.input.mean, config.input.std, config.data.name, fmt(mean), fmt(std),
                    fmt(mean), fmt(std))


# ---- On-device preprocessing: pure JAX, traced into the train and eval steps. ----

def normalize(images, mean, std):
  """uint8 NHWC -> float32, per-channel (x - mean) / std."""
  return (images.astype(jnp.float32) - jnp.asarray(mean)) / jnp.asarray(std)


def augment(images, draws, mode: str, padding: int, cutout: int = 0):
  """Random translation with zero fill (after normalization: the mean colour) and flip; then,
  with `cutout` > 0, a `cutout` x `cutout` square zeroed around a uniformly drawn centre,
  clipped where it crosses the border (DeVries & Taylor, 2017)."""
  n, h, w, c = images.shape
  if "crop" in mode and padding > 0:
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    crop = lambda img, s: jax.lax.dynamic_slice(img, (s[0], s[1], 0), (h, w, c))
    images = jax.vmap(crop)(padded, draws["shift"])
  if "flip" in mode:
    images = jnp.where(draws["flip"][:, None, None, None], images[:, :, ::-1], images)
  if cutout:
    first = jnp.floor(draws["cutout"] * jnp.array([h, w])).astype(jnp.int32) - cutout // 2
    erased = in_boxes(h, w, first[:, 0], first[:, 0] + cutout, first[:, 1], first[:, 1] + cutout)
    images = jnp.where(erased, jnp.zeros((), images.dtype), images)
  return images


def in_boxes(h: int, w: int, top, bottom, left, right):
  """(n, h, w, 1) masks, True inside each image's rows [top, bottom) and columns [left, right):
  what cutout, random erasing and CutMix replace."""
  rows = (jnp.arange(h) >= top[:, None]) & (jnp.arange(h) < bottom[:, None])
  cols = (jnp.arange(w) >= left[:, None]) & (jnp.arange(w) < right[:, None])
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def erase(images, draws):
  """Random erasing: each image's `draws['erase_box']` (top, left, height, width) replaced by
  `draws['erase_noise']` (per pixel or per channel), or by zeros (the mean colour) without it."""
  n, h, w, c = images.shape
  top, left, height, width = (draws["erase_box"][:, i] for i in range(4))
  fill = draws.get("erase_noise", jnp.zeros((n, 1, 1, c), images.dtype))
  return jnp.where(in_boxes(h, w, top, top + height, left, left + width), fill, images)


def translate(images, dy: int, dx: int):
  """Shifts images down by dy and right by dx pixels (negative: up, left), with zero fill."""
  return jax.lax.pad(images, jnp.zeros((), images.dtype),
                     [(0, 0, 0), (dy, -dy, 0), (dx, -dx, 0), (0, 0, 0)])


def resize(images, size: int):
  """The paper's resolution multiplier: bilinear resize to `size` x `size` (no-op if equal),
  antialiased when shrinking, as TensorFlow's `resize(antialias=True)`
  (`images.square_and_resize_tf`)."""
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (n, size, size, c), "bilinear", antialias=True)


def preprocess(images, config, draws=None):
  """uint8 images -> normalized (augmented if `draws` given) model inputs. RandAugment works on
  the uint8 images first (before the translation and flip here; after the host's crop and flip
  for streamed folders, as in timm); random erasing, as timm's, on the model's input (after the
  resize); Mixup and CutMix come last, in the train step (`mixing.py`), as they mix labels
  too."""
  if draws is not None and "randaugment_op" in draws:
    images = randaugment.apply(images, draws, randaugment.parse(config.augment.randaugment),
                               jnp.round(jnp.asarray(config.input.mean)))
  x = normalize(images, config.input.mean, config.input.std)
  if draws is not None:
    x = augment(x, draws, config.augment.name, config.augment.crop_padding, config.augment.cutout)
  x = resize(x, config.input.image_size)
  return erase(x, draws) if draws is not None and "erase_box" in draws else x


def eval_batches(split: Split, batch_size: int):
  """Pads the split to whole batches: images (b, batch, ...), labels and a 0/1 mask."""
  n = len(split.labels)
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  images = np.concatenate([split.images, np.zeros((pad, *split.images.shape[1:]), np.uint8)])
  labels = np.concatenate([split.labels, np.zeros((pad,), np.int32)])
  mask = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
  shape = lambda a: a.reshape(num_batches, batch_size, *a.shape[1:])
  return shape(images), shape(labels), shape(mask)
