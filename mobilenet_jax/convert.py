"""Weights in and out of the reference implementations: the Keras and the PyTorch CIFAR scripts.

Both references hold the same layers in the same order as this project's model:
the stem conv, then per block a depthwise conv and a pointwise conv, each followed
by BatchNorm, then the dense head. So a checkpoint maps layer by layer, in order,
whatever the reference named its layers; only the tensor layouts differ:

| tensor | here (Flax) | Keras | PyTorch |
|---|---|---|---|
| conv kernel | (kh, kw, in, out) | same | (out, in, kh, kw) |
| depthwise kernel | (kh, kw, 1, C) | (kh, kw, C, 1) | (C, 1, kh, kw) |
| dense kernel | (in, out) | same | (out, in) |
| BatchNorm | scale, bias, mean, var | gamma, beta, moving_mean, moving_variance | weight, bias, running_mean, running_var |

The layouts must match too: `configs/cifar.py`'s default preset is the Keras
script's (TensorFlow padding, Keras BatchNorm), `torch` the PyTorch script's.

From a file to a workdir (a step-0 checkpoint, config.json, label names) that
`predict`, `export` and `--config.mode=eval` read:

  python -m mobilenet_jax.convert --config=configs/cifar.py --keras_file=mobilenet.h5 \
      --workdir=workdirs/from_keras
  python -m mobilenet_jax.convert --config=configs/cifar.py:torch --torch_file=ckpt.pth \
      --workdir=workdirs/from_torch
"""
import json
import os

import numpy as np

_BN_FLAX = ("scale", "bias", "mean", "var")
_BN_TORCH = ("weight", "bias", "running_mean", "running_var")


def layer_names(variables) -> list[str]:
  """The model's conv/dense layers in forward order: 'stem', 'block1/depthwise', ..., 'head'."""
  blocks = sorted((k for k in variables["params"] if k.startswith("block")),
                  key=lambda k: int(k[len("block"):]))
  return ["stem", *(f"{b}/{part}" for b in blocks for part in ("depthwise", "pointwise")), "head"]


def _get(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def _layers(variables):
  """(name, conv-or-dense params, BatchNorm params and statistics or None) in forward order."""
  for name in layer_names(variables):
    if name == "head":
      yield name, variables["params"]["head"], None
    else:
      params, stats = _get(variables["params"], name), _get(variables["batch_stats"], name)
      yield name, params["conv"], {"scale": params["bn"]["scale"], "bias": params["bn"]["bias"],
                                   "mean": stats["bn"]["mean"], "var": stats["bn"]["var"]}


def _assemble(template, tensors):
  """`template`'s structure with `tensors` ({'stem/conv/kernel': array, ...}) filled in, each
  checked against the template's shape."""
  def fill(tree, prefix):
    out = {}
    for key, value in tree.items():
      path = f"{prefix}{key}"
      if isinstance(value, dict):
        out[key] = fill(value, path + "/")
        continue
      if path not in tensors:
        raise ValueError(f"The checkpoint has no tensor for {path} (expected shape "
                         f"{tuple(np.shape(value))}): it holds another model or layout.")
      array = np.asarray(tensors.pop(path), np.float32)
      if array.shape != tuple(np.shape(value)):
        raise ValueError(f"{path}: the checkpoint's tensor has shape {array.shape}, the configured "
                         f"model expects {tuple(np.shape(value))}: check config.model.alpha, "
                         "num_classes, shallow and use_bias against the file.")
      out[key] = array
    return out
  return {"params": fill(template["params"], "params/"),
          "batch_stats": fill(template["batch_stats"], "batch_stats/")}


def _flax_tensors(template, kernels, norms, biases, head):
  """Flat {path: array} for `_assemble` from per-layer lists in forward order."""
  names = layer_names(template)
  convs = names[:-1]
  if len(kernels) != len(names) - 1 or len(norms) != len(convs):
    raise ValueError(f"The checkpoint has {len(kernels)} convolutions and {len(norms)} "
                     f"BatchNorms; the configured model has {len(convs)} of each (another depth: "
                     "check config.model.shallow).")
  tensors = {"params/head/kernel": head[0], "params/head/bias": head[1]}
  for name, kernel, norm, bias in zip(convs, kernels, norms, biases):
    tensors[f"params/{name}/conv/kernel"] = kernel
    if bias is not None:
      tensors[f"params/{name}/conv/bias"] = bias
    tensors[f"params/{name}/bn/scale"], tensors[f"params/{name}/bn/bias"] = norm[0], norm[1]
    tensors[f"batch_stats/{name}/bn/mean"], tensors[f"batch_stats/{name}/bn/var"] = norm[2:4]
  return tensors


def _finish(template, tensors):
  tensors = {path: value for path, value in tensors.items() if value is not None}
  variables = _assemble(template, tensors)
  if tensors:
    first = sorted(tensors)[0]
    raise ValueError(f"The checkpoint has a tensor the configured model lacks: {first} "
                     f"(shape {np.shape(tensors[first])}): check config.model.use_bias.")
  return variables


# ---- PyTorch: a state_dict of numpy arrays (or anything np.asarray reads). ----

def from_torch(state_dict, template) -> dict:
  """A PyTorch reference `state_dict` -> {'params', 'batch_stats'} shaped like `template`.

  Convolutions are its 4-D `weight`s, BatchNorms the groups with `running_mean`,
  the head the last 2-D `weight`, all in the order of the state_dict (which is
  the order the modules were defined in).
  """
  kernels, biases, norms, head = [], [], [], None
  for key, value in state_dict.items():
    prefix, _, leaf = key.rpartition(".")
    value = np.asarray(value)
    if leaf == "running_mean":
      norms.append(tuple(np.asarray(state_dict[f"{prefix}.{n}"]) for n in _BN_TORCH))
    elif leaf == "weight" and value.ndim == 4:
      kernels.append(value.transpose(2, 3, 1, 0))  # Depthwise (C, 1, kh, kw) too.
      biases.append(state_dict.get(f"{prefix}.bias"))
    elif leaf == "weight" and value.ndim == 2:
      head = (value.T, state_dict.get(f"{prefix}.bias"))
  if head is None:
    raise ValueError("The state_dict has no 2-D linear weight: it is not a MobileNetV1 classifier.")
  return _finish(template, _flax_tensors(template, kernels, norms, biases, head))


def to_torch(variables) -> dict:
  """{'params', 'batch_stats'} -> a PyTorch reference `state_dict` of numpy arrays, with the keys
  of the PyTorch CIFAR reference (kuangliu/pytorch-cifar's `MobileNet`: `conv1`, `bn1`,
  `layers.N.conv1`, `layers.N.bn1`, `layers.N.conv2`, `layers.N.bn2`, `linear`)."""
  layers = list(_layers(variables))
  names = ["conv1", "bn1"]
  for i in range((len(layers) - 2) // 2):
    names += [f"layers.{i}.conv1", f"layers.{i}.bn1", f"layers.{i}.conv2", f"layers.{i}.bn2"]
  names = iter([*names, "linear"])
  state = {}
  for _, params, norm in layers:
    module = next(names)
    if norm is None:
      state[f"{module}.weight"] = np.asarray(params["kernel"]).T
      state[f"{module}.bias"] = np.asarray(params["bias"])
      continue
    state[f"{module}.weight"] = np.asarray(params["kernel"]).transpose(3, 2, 0, 1)
    if "bias" in params:
      state[f"{module}.bias"] = np.asarray(params["bias"])
    bn = next(names)
    for ours, theirs in zip(_BN_FLAX, _BN_TORCH):
      state[f"{bn}.{theirs}"] = np.asarray(norm[ours])
    state[f"{bn}.num_batches_tracked"] = np.asarray(0, np.int64)
  return state


# ---- Keras: a built Keras model (keras.Model), e.g. loaded from the reference's .h5. ----

def _keras_layers(model):
  """The Keras model's conv, BatchNorm and dense layers in forward order."""
  kinds = ("Conv2D", "DepthwiseConv2D", "BatchNormalization", "Dense")
  return [layer for layer in model.layers if type(layer).__name__ in kinds]


def from_keras(model, template) -> dict:
  """A Keras reference model -> {'params', 'batch_stats'} shaped like `template`."""
  kernels, biases, norms, head = [], [], [], None
  for layer in _keras_layers(model):
    kind, weights = type(layer).__name__, [np.asarray(w) for w in layer.get_weights()]
    if kind == "BatchNormalization":
      norms.append(tuple(weights))
    elif kind == "Dense":
      head = (weights[0], weights[1])
    else:
      kernel = weights[0].transpose(0, 1, 3, 2) if kind == "DepthwiseConv2D" else weights[0]
      kernels.append(kernel)
      biases.append(weights[1] if len(weights) > 1 else None)
  if head is None:
    raise ValueError("The Keras model has no Dense head: it is not a MobileNetV1 classifier.")
  return _finish(template, _flax_tensors(template, kernels, norms, biases, head))


def to_keras(variables, model) -> None:
  """Writes {'params', 'batch_stats'} into a Keras reference model built with the same layout."""
  layers = iter(_keras_layers(model))
  for _, params, norm in _layers(variables):
    layer = next(layers)
    kernel = np.asarray(params["kernel"])
    if type(layer).__name__ == "DepthwiseConv2D":
      kernel = kernel.transpose(0, 1, 3, 2)
    layer.set_weights([kernel, *([np.asarray(params["bias"])] if "bias" in params else [])])
    if norm is not None:
      next(layers).set_weights([np.asarray(norm[k]) for k in _BN_FLAX])


# ---- A workdir from converted weights. ----

CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                  "truck")


def template_variables(config) -> dict:
  """Host arrays {'params', 'batch_stats'} of the configured model, for the from_* functions."""
  import jax  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model(config.model)
  shape = (1, config.image_size, config.image_size, 3)
  return jax.tree.map(np.asarray, model.init(jax.random.key(0), np.zeros(shape, np.float32),
                                             train=False))


def write_workdir(config, variables, workdir: str, label_names=None) -> None:
  """A step-0 checkpoint of `variables` with config.json and label names, as run.py leaves them."""
  import jax  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import checkpoints, inference, models, steps  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(workdir, "checkpoints")):
    raise ValueError(f"--workdir={workdir} already holds checkpoints: pass a new folder.")
  if label_names is None:
    label_names = (CIFAR10_LABELS if config.model.num_classes == 10 else
                   tuple(f"class_{i}" for i in range(config.model.num_classes)))
  state = steps.create_train_state(models.create_model(config.model),
                                   steps.create_optimizer(config, 1), jax.random.key(0),
                                   config.image_size)
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpoints.Checkpointer(workdir, config.keep_checkpoints)
  try:
    checkpointer.save(jax.device_get(state))
  finally:
    checkpointer.close()
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  inference.save_label_names(workdir, label_names)


def _read(keras_file, torch_file, template):
  if bool(keras_file) == bool(torch_file):
    raise ValueError("Pass one of --keras_file (the Keras script's .h5 or .keras) and "
                     "--torch_file (the PyTorch script's state_dict, torch.save'd).")
  if keras_file:
    import keras  # pylint: disable=g-import-not-at-top
    return from_keras(keras.models.load_model(keras_file, compile=False), template)
  import torch  # pylint: disable=g-import-not-at-top
  state_dict = torch.load(torch_file, map_location="cpu")
  state_dict = state_dict.get("net", state_dict)  # pytorch-cifar saves {'net': ..., 'acc': ...}.
  return from_torch({k: v.numpy() for k, v in state_dict.items()}, template)


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  variables = _read(f.keras_file, f.torch_file, template_variables(f.config))
  write_workdir(f.config, variables, f.workdir)
  print(f"Wrote {f.workdir}: `python -m mobilenet_jax.predict --workdir={f.workdir} IMAGE` "
        "classifies with it.", flush=True)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "The reference's preset: configs/cifar.py "
                                  "(Keras) or configs/cifar.py:torch (PyTorch).")
  flags.DEFINE_string("keras_file", None, "The Keras reference's model file (.h5, .keras).")
  flags.DEFINE_string("torch_file", None, "The PyTorch reference's state_dict file.")
  flags.DEFINE_string("workdir", None, "A new folder for the converted workdir.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
