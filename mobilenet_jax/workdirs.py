"""Trained workdirs: their config (old ones included), label names, latest variables, and
`init_from`, which starts a new run from one."""
import dataclasses
import functools
import json
import os

from absl import logging
import jax
import ml_collections

from mobilenet_jax import checkpoints, inference, models

LABELS_FILE = "label_names.json"
# Config fields added after a workdir may have been trained, with the values it was trained with.
ADDED_FIELDS = {"eval_flip": False, "model.kernel_init": "he_normal", "inference_chunk": None,
                "eval_shift": 0, "train_split": "train", "eval_split": "test",
                "model.padding": "symmetric", "model.activation": "relu",
                "model.bn_momentum": 0.9, "model.bn_epsilon": 1e-5, "model.dropout": 0.0,
                "eval_crop": None, "eval_resize": "bilinear", "init_from": None,
                "class_names": None}


@dataclasses.dataclass(frozen=True)
class Trained:
  config: ml_collections.ConfigDict
  model: models.MobileNetV1
  variables: dict  # {'params', 'batch_stats'}
  label_names: tuple[str, ...]
  step: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """A workdir's config.json, with fields added since it was written at their old values."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{config_path} does not exist: the workdir must be a folder that "
                            "`python run.py --workdir=...` trained in, or that "
                            "`python -m mobilenet_jax.convert` wrote.")
  with open(config_path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  if "lr_values" not in config:  # Written as decay factors before 2026-12-02.
    rates = [config.learning_rate]
    for decay in config.lr_decay:
      rates.append(rates[-1] * decay)
    del config["lr_decay"]
    config.lr_values = tuple(rates[1:])
  for path, value in ADDED_FIELDS.items():
    *parents, name = path.split(".")
    node = functools.reduce(getattr, parents, config)
    if name not in node:
      node[name] = value
  return config


def load(workdir: str) -> Trained:
  """Restores the latest checkpoint of a `run.py` workdir with the config saved beside it."""
  config = load_config(workdir)
  state = checkpoints.restore_trained(workdir, config)
  with open(os.path.join(workdir, LABELS_FILE), encoding="utf-8") as f:
    label_names = tuple(json.load(f))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return Trained(config, models.create_model(config.model), variables, label_names,
                 int(state.step))


def save_label_names(workdir: str, label_names) -> None:
  with open(os.path.join(workdir, LABELS_FILE), "w", encoding="utf-8") as f:
    json.dump(list(label_names), f)


# The layout fields a model's weights are tied to: init_from requires the same.
LAYOUT_FIELDS = ("alpha", "stem_stride", "shallow", "use_bias", "padding", "activation",
                 "bn_epsilon")


def start_from(state, config):
  """`state` with the params and BatchNorm statistics of `config.init_from`'s latest checkpoint.

  The layout (LAYOUT_FIELDS, input normalization) must be the same: weights do not carry over
  between paddings or activations. A head of another class count keeps its fresh init.
  """
  source = load(config.init_from)
  differ = [f"--config.model.{k}={source.config.model[k]!r}" for k in LAYOUT_FIELDS
            if source.config.model[k] != config.model[k]]
  differ += [f"--config.{k}='{tuple(source.config[k])}'" for k in ("mean", "std")
             if tuple(source.config[k]) != tuple(config[k])]
  if differ:
    raise ValueError(f"config.init_from={config.init_from} holds a model of another layout: "
                     f"pass {' '.join(differ)} (or the preset it was trained or converted with).")
  params = dict(source.variables["params"])
  theirs, ours = params["head"]["kernel"].shape, state.params["head"]["kernel"].shape
  if theirs != ours:
    params["head"] = state.params["head"]
    logging.info("Starting from %s (step %d); its head (%d classes) is replaced by a new one "
                 "for %d classes.", config.init_from, source.step, theirs[-1], ours[-1])
  else:
    logging.info("Starting from %s (step %d).", config.init_from, source.step)
  return state.replace(params=params, batch_stats=source.variables["batch_stats"])


def logits_fn(trained: Trained):
  """A jitted function: uint8 images (n, h, w, 3) of any size -> logits, computed as in eval."""
  return jax.jit(lambda images: inference.eval_logits(
      trained.model.apply, trained.variables, images, trained.config,
      inference.Views.of(trained.config)))
