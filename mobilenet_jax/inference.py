"""A trained model from a workdir: config, label names, inference variables and preprocessing."""
import dataclasses
import functools
import json
import os

import jax
import ml_collections
import numpy as np

from mobilenet_jax import checkpoints, models, steps

LABELS_FILE = "label_names.json"
# Config fields added after a workdir may have been trained, with the values it was trained with.
ADDED_FIELDS = {"eval_flip": False, "model.kernel_init": "he_normal", "inference_chunk": None,
                "eval_shift": 0, "train_split": "train", "eval_split": "test",
                "model.padding": "symmetric", "model.activation": "relu",
                "model.bn_momentum": 0.9, "model.bn_epsilon": 1e-5}


@dataclasses.dataclass(frozen=True)
class Trained:
  config: ml_collections.ConfigDict
  model: models.MobileNetV1
  variables: dict  # {'params', 'batch_stats'}
  label_names: tuple[str, ...]
  step: int


def load(workdir: str) -> Trained:
  """Restores the latest checkpoint of a `run.py` workdir with the config saved beside it."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} does not exist: --workdir must be a folder that "
                            "`python run.py --workdir=...` trained in.")
  with open(config_path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  for path, value in ADDED_FIELDS.items():
    *parents, name = path.split(".")
    node = functools.reduce(getattr, parents, config)
    if name not in node:
      node[name] = value
  state = checkpoints.restore_trained(workdir, config)
  with open(os.path.join(workdir, LABELS_FILE), encoding="utf-8") as f:
    label_names = tuple(json.load(f))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return Trained(config, models.create_model(config.model), variables, label_names,
                 int(state.step))


def save_label_names(workdir: str, label_names) -> None:
  with open(os.path.join(workdir, LABELS_FILE), "w", encoding="utf-8") as f:
    json.dump(list(label_names), f)


def read_image(path: str) -> np.ndarray:
  """An RGB uint8 (h, w, 3) array from a PNG or JPEG file.

  Grayscale images are replicated to three channels and an alpha channel is dropped
  (transparent pixels keep their colour values), as the model only knows RGB.
  """
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      if image.format not in ("PNG", "JPEG"):
        raise ValueError(f"{path}: a {image.format} image; PNG or JPEG expected.")
      return np.asarray(image.convert("RGB"), np.uint8)
  except FileNotFoundError as e:
    raise ValueError(f"{path}: no such file.") from e
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"{path}: not a readable image ({e}); PNG or JPEG expected.") from e


def logits_fn(trained: Trained):
  """A jitted function: uint8 images (n, h, w, 3) of any size -> logits, computed as in eval."""
  return jax.jit(lambda images: steps.eval_logits(trained.model.apply, trained.variables, images,
                                                  trained.config, trained.config.eval_shift))
