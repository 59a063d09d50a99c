"""A workdir's files, owned here: their names, config.json (old ones included), label names,
results, the checkpoints' folder, the latest trained variables, and `init_from`, which starts
a new run from a workdir. train, convert, predict and export all read and write through it."""
import dataclasses
import json
import os

from absl import logging
import jax
import ml_collections

from mobilenet_jax import checkpoints, errors, inference, metric_logging, models

CONFIG_FILE = "config.json"          # The run's config (load_config reads older ones too).
LABELS_FILE = "label_names.json"     # The class names, in label order.
RESULTS_FILE = "results.json"        # The final evaluation, speed and size.
METRICS_FILE = metric_logging.METRICS_FILE  # One JSON record per log.
CHECKPOINTS_DIR = "checkpoints"      # Orbax checkpoints, one folder per step (checkpoints.py).

# Where each field of the flat config (config.json written before 2026-12-05) went.
RENAMES = {
    "dataset": "data.name", "data_dir": "data.dir", "download": "data.download",
    "train_split": "data.train_split", "eval_split": "data.eval_split",
    "train_examples": "data.train_examples", "eval_examples": "data.eval_examples",
    "folder_holdout": "data.folder_holdout", "class_names": "data.class_names",
    "batch_size": "input.batch_size", "per_process_batch_size": "input.per_process_batch_size",
    "input": "input.mode", "input_device_share": "input.device_share",
    "input_workers": "input.workers", "prefetch": "input.prefetch",
    "image_size": "input.image_size", "mean": "input.mean", "std": "input.std",
    "augment": "augment.name", "crop_padding": "augment.crop_padding",
    "alternate_flips": "augment.alternate_flips", "cutout": "augment.cutout",
    "label_smoothing": "augment.label_smoothing",
    "momentum": "optim.momentum", "weight_decay": "optim.weight_decay",
    "learning_rate": "schedule.learning_rate", "lr_boundaries": "schedule.boundaries",
    "lr_values": "schedule.rates", "lr_batch": "schedule.reference_batch",
    "eval_every_epochs": "eval.every_epochs", "eval_flip": "eval.flip",
    "eval_shift": "eval.shift", "eval_crop": "eval.crop", "eval_resize": "eval.resize",
    "inference_chunk": "eval.chunk",
    "checkpoint_every_epochs": "checkpoint.every_epochs", "keep_checkpoints": "checkpoint.keep",
    "progress_bar": "log.progress_bar",
    "distributed": "distributed.enabled",
    "coordinator_address": "distributed.coordinator_address",
    "num_processes": "distributed.num_processes", "process_id": "distributed.process_id",
    "distributed_timeout_s": "distributed.timeout_s",
    "heartbeat_timeout_s": "distributed.heartbeat_timeout_s",
}
# Flat fields added before the grouping, at the values a workdir without them was trained with.
FLAT_ADDED = {"eval_flip": False, "inference_chunk": None, "eval_shift": 0,
              "train_split": "train", "eval_split": "test", "eval_crop": None,
              "eval_resize": "bilinear", "init_from": None, "class_names": None}
MODEL_ADDED = {"kernel_init": "he_normal", "padding": "symmetric", "activation": "relu",
               "bn_momentum": 0.9, "bn_epsilon": 1e-5, "dropout": 0.0}
# Grouped fields added since, likewise: the grouping itself added the step cadences.
ADDED_FIELDS = {"checkpoint.every_steps": None, "log.every_steps": None}


@dataclasses.dataclass(frozen=True)
class Trained:
  config: ml_collections.ConfigDict
  model: models.MobileNetV1
  variables: dict  # {'params', 'batch_stats'}
  label_names: tuple[str, ...]
  step: int


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))


def has_config(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, CONFIG_FILE))


def _write(workdir: str, name: str, text: str) -> None:
  """Writes the file whole or not at all: a temporary file, then a rename over the old one."""
  path = os.path.join(workdir, name)
  temporary = f"{path}.tmp.{os.getpid()}"
  with open(temporary, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(temporary, path)


def write_config(workdir: str, config) -> None:
  _write(workdir, CONFIG_FILE, config.to_json_best_effort(indent=2))


def save_label_names(workdir: str, label_names) -> None:
  _write(workdir, LABELS_FILE, json.dumps(list(label_names)))


def write_results(workdir: str, results: dict) -> None:
  _write(workdir, RESULTS_FILE, json.dumps(results, indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """A workdir's config.json, in today's groups (`upgrade`: older ones too)."""
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not has_config(workdir):
    raise errors.WorkdirError(f"{config_path} does not exist: the workdir must be a folder that "
                              "`python run.py --workdir=...` trained in, or that "
                              "`python -m mobilenet_jax.convert` wrote.")
  with open(config_path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(upgrade(json.load(f)))


def upgrade(saved: dict) -> dict:
  """A config.json's contents in today's groups: a flat one (written before the grouping) is
  moved field by field (RENAMES), with the fields it predates at the values it trained with."""
  if "data" not in saved:
    saved = _group(_flat_upgrade(dict(saved)))
  for path, value in ADDED_FIELDS.items():
    group, name = path.split(".")
    saved.setdefault(group, {}).setdefault(name, value)
  return saved


def _flat_upgrade(flat: dict) -> dict:
  if "lr_values" not in flat:  # Written as decay factors before 2026-12-02.
    rates = [flat["learning_rate"]]
    for decay in flat.pop("lr_decay"):
      rates.append(rates[-1] * decay)
    flat["lr_values"] = rates[1:]
  flat = {**FLAT_ADDED, **flat}
  flat["model"] = {**MODEL_ADDED, **flat["model"]}
  return flat


def _group(flat: dict) -> dict:
  grouped = {}
  for key, value in flat.items():
    group, _, name = RENAMES.get(key, key).rpartition(".")
    (grouped.setdefault(group, {}) if group else grouped)[name] = value
  return grouped


def restore_trained(workdir: str, config):
  """The latest TrainState of a trained workdir, for evaluation and inference (none: an error)."""
  directory = checkpoint_dir(workdir)
  train_first = f"train first with `.venv/bin/python run.py --config=... --workdir={workdir}`."
  if not os.path.isdir(directory):  # Checkpointer would create it.
    raise errors.WorkdirError(f"No {CHECKPOINTS_DIR}/ in {workdir}: {train_first}")
  checkpointer = checkpoints.Checkpointer(directory, config.checkpoint.keep)
  try:
    if checkpointer.latest_step() is None:
      raise errors.WorkdirError(f"No checkpoint in {directory}: {train_first}")
    return checkpointer.restore(checkpoints.state_template(config))
  finally:
    checkpointer.close()


def load(workdir: str) -> Trained:
  """Restores the latest checkpoint of a `run.py` workdir with the config saved beside it."""
  config = load_config(workdir)
  state = restore_trained(workdir, config)
  with open(os.path.join(workdir, LABELS_FILE), encoding="utf-8") as f:
    label_names = tuple(json.load(f))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return Trained(config, models.create_model(config.model), variables, label_names,
                 int(state.step))


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
  differ += [f"--config.input.{k}='{tuple(source.config.input[k])}'" for k in ("mean", "std")
             if tuple(source.config.input[k]) != tuple(config.input[k])]
  if differ:
    raise errors.ConfigError(
        f"config.init_from={config.init_from} holds a model of another layout: "
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
