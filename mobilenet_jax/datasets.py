"""Which data, and how it reaches the devices: `config.data.name` and `config.input.mode`.

A tfds name (`input_pipeline.py`), `folder:PATH` (`folders.py`) or `npz:PATH` (`arrays.py`);
then `device` holds the splits in device memory (every step gathers its batch there), `stream`
reads each step's batch on the host (`streaming.py`), and `auto` picks `device` when the
training split takes at most `config.input.device_share` of one device's memory, else `stream`.
"""
import os

from absl import logging
import jax

from mobilenet_jax import arrays, errors, folders, input_pipeline, streaming

INPUT_MODES = ("device", "stream", "auto")


def check_config(config) -> None:
  if config.input.mode not in INPUT_MODES:
    raise errors.ConfigError(
        f"config.input.mode={config.input.mode!r}: expected one of {INPUT_MODES}.")
  if not 0 < config.input.device_share <= 1:
    raise errors.ConfigError(
        f"config.input.device_share={config.input.device_share}: expected a share "
        "of device memory in (0, 1], e.g. 0.5.")
  if config.input.prefetch < 1 or (config.input.workers is not None and config.input.workers < 1):
    raise errors.ConfigError(
        f"config.input.prefetch={config.input.prefetch}, config.input.workers="
        f"{config.input.workers}: both must be >= 1 (workers None: one "
        "thread per CPU core).")
  if config.augment.name == "inception" and not folders.is_folder(config.data.name):
    raise errors.ConfigError(
        f"config.augment.name='inception' crops image files on the host; "
        f"config.data.name={config.data.name!r} is stored at one size: use "
        "--config.augment.name=crop+flip, or a folder:PATH dataset.")
  if arrays.is_arrays(config.data.name) and (config.data.train_split, config.data.eval_split) != (
      "train", "test"):
    raise errors.ConfigError(
        f"config.data.train_split={config.data.train_split!r}, config.data.eval_split="
        f"{config.data.eval_split!r}: an npz: dataset's splits are its x_train and "
        "x_test; use config.data.train_examples / eval_examples to keep fewer.")
  if config.augment.name == "inception" and config.input.mode == "device":
    raise errors.ConfigError(
        "config.augment.name='inception' crops each image file anew every step, on "
        "the host: use --config.input.mode=stream (or auto).")


def device_memory_bytes() -> int:
  """One local device's memory (host RAM for CPU devices, which report none)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return stats["bytes_limit"]
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def input_mode(config, train) -> str:
  """config.input.mode, with `auto` resolved (and logged) for the training split `train`."""
  if config.input.mode != "auto":
    return config.input.mode
  size, limit = streaming.image_bytes(train, config), device_memory_bytes()
  mode = ("stream" if config.augment.name == "inception" or size > config.input.device_share * limit
          else "device")
  logging.info("config.input.mode='auto': the training split takes %.2f GB of the device's %.2f GB "
               "(config.input.device_share=%s): %s input.", size / 1e9, limit / 1e9,
               config.input.device_share, mode)
  return mode


def load(config):
  """(an `input_pipeline.Dataset`, its input mode): with `device` its splits are in host
  memory, ready to go on the devices; with `stream` they are sources the host reads from."""
  if folders.is_folder(config.data.name):
    train, test, names = folders.load(config)
  elif arrays.is_arrays(config.data.name):
    train, test, names = arrays.load(config)
  else:
    data = input_pipeline.load(config)
    train, test, names = data.train, data.test, data.label_names
  mode = input_mode(config, train)
  if mode == "device" and not train.fixed_size:  # Files: decoded once, all of them.
    train, test = streaming.read_all(train, config), streaming.read_all(test, config)
  return input_pipeline.Dataset(train, test, len(names), names), mode
