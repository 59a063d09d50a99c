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
"""
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


def to_torch(variables, names=None) -> dict:
  """{'params', 'batch_stats'} -> a PyTorch reference `state_dict` of numpy arrays.

  Keys are those of the PyTorch CIFAR reference (kuangliu/pytorch-cifar's
  `MobileNet`: `conv1`, `bn1`, `layers.N.conv1`, `layers.N.bn1`, `layers.N.conv2`,
  `layers.N.bn2`, `linear`) unless `names` gives the module name of each layer
  and BatchNorm in forward order (conv, bn, conv, bn, ..., head).
  """
  layers = list(_layers(variables))
  if names is None:
    names = ["conv1", "bn1"]
    for i in range((len(layers) - 2) // 2):
      names += [f"layers.{i}.conv1", f"layers.{i}.bn1", f"layers.{i}.conv2", f"layers.{i}.bn2"]
    names.append("linear")
  names = iter(names)
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
