"""Weights in and out of the reference implementations and the public pretrained checkpoints.

Formats (`--format`):
- keras: the Keras CIFAR script's model file (.h5, .keras);
- torch: the PyTorch CIFAR script's `state_dict` (kuangliu/pytorch-cifar's `MobileNet`);
- keras_app: Keras applications' `MobileNet` (alpha 0.25-1.0 at 128-224 pixels, with or
  without its top), downloaded by Keras or from a file;
- timm: timm's `mobilenetv1_100` (a .safetensors file, read without torch, or a state_dict).

All hold the same layers in the same order as this project's model: the stem conv, then per
block a depthwise conv and a pointwise conv, each followed by BatchNorm, then the head (a
dense layer, or Keras applications' 1x1 conv). So a checkpoint maps layer by layer, in order,
whatever it named its layers; only the tensor layouts differ:

| tensor | here (Flax) | Keras | PyTorch |
|---|---|---|---|
| conv kernel | (kh, kw, in, out) | same | (out, in, kh, kw) |
| depthwise kernel | (kh, kw, 1, C) | (kh, kw, C, 1) | (C, 1, kh, kw) |
| dense kernel | (in, out) | same (a 1x1 conv: (1, 1, in, out)) | (out, in) |
| BatchNorm | scale, bias, mean, var | gamma, beta, moving_mean, moving_variance | weight, bias, running_mean, running_var |

The layout (padding, activation, BatchNorm) is the config's: each format's default config is
its own (`DEFAULT_CONFIGS`). From a file to a workdir (a step-0 checkpoint, config.json,
label names) that `predict`, `export`, `--config.mode=eval` and `init_from` read, and back:

  python -m mobilenet_jax.convert --format=keras_app --alpha=0.5 --image_size=160 \
      --workdir=workdirs/keras_0.5_160            # Keras downloads mobilenet_5_0_160_tf.h5
  python -m mobilenet_jax.convert --format=timm --file=model.safetensors --workdir=workdirs/timm
  python -m mobilenet_jax.convert --format=torch --file=ckpt.pth --workdir=workdirs/from_torch
  python -m mobilenet_jax.convert --format=timm --workdir=workdirs/timm --out=back.safetensors
"""
import os
import sys

from absl import app, flags, logging
import numpy as np

from mobilenet_jax import checkpoints, config_lib, errors, models, sampler, workdirs

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
        raise errors.FileError(
            f"The checkpoint has no tensor for {path} (expected shape "
            f"{tuple(np.shape(value))}): it holds another model or layout.")
      array = np.asarray(tensors.pop(path), np.float32)
      if array.shape != tuple(np.shape(value)):
        raise errors.FileError(
            f"{path}: the checkpoint's tensor has shape {array.shape}, the configured "
            f"model expects {tuple(np.shape(value))}: check config.model.alpha, "
            "num_classes, shallow and use_bias against the file.")
      out[key] = array
    return out
  return {"params": fill(template["params"], "params/"),
          "batch_stats": fill(template["batch_stats"], "batch_stats/")}


def _flax_tensors(template, kernels, norms, biases, head):
  """Flat {path: array} for `_assemble` from per-layer lists in forward order."""
  convs = layer_names(template)[:-1]
  if len(kernels) != len(convs) or len(norms) != len(convs):
    raise errors.FileError(
        f"The checkpoint has {len(kernels)} convolutions and {len(norms)} "
        f"BatchNorms; the configured model has {len(convs)} of each (another "
        "architecture, or depth: check config.model.shallow)"
        f"{_first_difference(template, convs, kernels)}.")
  tensors = {"params/head/kernel": head[0], "params/head/bias": head[1]}
  for name, kernel, norm, bias in zip(convs, kernels, norms, biases):
    tensors[f"params/{name}/conv/kernel"] = kernel
    if bias is not None:
      tensors[f"params/{name}/conv/bias"] = bias
    tensors[f"params/{name}/bn/scale"], tensors[f"params/{name}/bn/bias"] = norm[0], norm[1]
    tensors[f"batch_stats/{name}/bn/mean"], tensors[f"batch_stats/{name}/bn/var"] = norm[2:4]
  return tensors


def _first_difference(template, convs, kernels) -> str:
  for name, kernel in zip(convs, kernels):
    expected = np.shape(_get(template["params"], name)["conv"]["kernel"])
    if np.shape(kernel) != expected:
      return (f"; the first that differs: params/{name}/conv/kernel has shape "
              f"{np.shape(kernel)}, expected {expected}")
  return ""


def _finish(template, tensors, headless=False):
  """Variables from flat `tensors`; `headless`: a checkpoint without its top keeps the template's
  (freshly initialized) head."""
  tensors = {path: value for path, value in tensors.items() if value is not None}
  if headless:
    tensors.update({f"params/head/{k}": v for k, v in template["params"]["head"].items()})
  variables = _assemble(template, tensors)
  if tensors:
    first = sorted(tensors)[0]
    raise errors.FileError(
        f"The checkpoint has a tensor the configured model lacks: {first} "
        f"(shape {np.shape(tensors[first])}): check config.model.use_bias.")
  return variables


# ---- PyTorch and timm: a state_dict of numpy arrays (or anything np.asarray reads). ----

def from_torch(state_dict, template) -> dict:
  """A PyTorch reference or timm `state_dict` -> {'params', 'batch_stats'} shaped like `template`.

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
    raise errors.FileError(
        "The state_dict has no 2-D linear weight: it is not a MobileNetV1 classifier.")
  return _finish(template, _flax_tensors(template, kernels, norms, biases, head))


def _module_names(layers, naming: str) -> list[str]:
  """The state_dict module of each conv, BatchNorm and the head, in forward order: the PyTorch
  CIFAR reference's (kuangliu/pytorch-cifar: `conv1`, `bn1`, `layers.N.conv1`, ..., `linear`) or
  timm's (`conv_stem`, `bn1`, `blocks.STAGE.I.conv_dw`, ..., `classifier`; a stage per stride 2)."""
  blocks = [int(name.split("/")[0][len("block"):]) - 1 for name, _, _ in layers[1:-1:2]]
  if naming == "torch":
    names = ["conv1", "bn1"]
    for i in range(len(blocks)):
      names += [f"layers.{i}.conv1", f"layers.{i}.bn1", f"layers.{i}.conv2", f"layers.{i}.bn2"]
    return [*names, "linear"]
  if len(blocks) != len(models.BLOCKS):
    raise errors.FileError(
        "timm's MobileNetV1 has all 13 blocks: config.model.shallow must be False.")
  names, stage, index = ["conv_stem", "bn1"], 0, 0
  for i, (_, strides) in enumerate(models.BLOCKS):
    stage, index = (stage + 1, 0) if strides == 2 else (stage, index + (i > 0))
    block = f"blocks.{stage}.{index}"
    names += [f"{block}.conv_dw", f"{block}.bn1", f"{block}.conv_pw", f"{block}.bn2"]
  return [*names, "classifier"]


def to_torch(variables, naming: str = "torch") -> dict:
  """{'params', 'batch_stats'} -> a state_dict of numpy arrays with the PyTorch CIFAR reference's
  keys (`naming='torch'`) or timm's (`'timm'`), which they load with `strict=True`."""
  layers = list(_layers(variables))
  names = iter(_module_names(layers, naming))
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


# Module names of the two state_dict namings in forward order (`_module_names`): safetensors
# files keep tensors sorted by name, so `_forward_order` restores the order `from_torch` reads.
_MODULE_ORDER = ("conv_stem", "conv_dw", "conv1", "bn1", "conv_pw", "conv2", "bn2", "blocks",
                 "layers", "linear", "classifier")


def _forward_order(key: str):
  return [(0, int(part), "") if part.isdigit() else
          (1, _MODULE_ORDER.index(part) if part in _MODULE_ORDER else len(_MODULE_ORDER), part)
          for part in key.split(".")[:-1]]


def read_state_dict(path: str) -> dict:
  """A state_dict of numpy arrays from a .safetensors file (no torch needed) or a torch.save'd
  file (a bare state_dict, or one under 'net', 'state_dict' or 'model' as training scripts save)."""
  if path.endswith(".safetensors"):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    tensors = safetensors_numpy.load_file(path)
    return {key: tensors[key] for key in sorted(tensors, key=_forward_order)}
  import torch  # pylint: disable=g-import-not-at-top
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("net", "state_dict", "model"):
    if isinstance(state_dict.get(key), dict):
      state_dict = state_dict[key]
  return {k: v.numpy() for k, v in state_dict.items()}


def write_state_dict(state_dict, path: str) -> None:
  """.safetensors (with safetensors alone), else torch.save."""
  if path.endswith(".safetensors"):
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
    return
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, path)


# ---- Keras: a built Keras model (keras.Model), from the reference's file or keras.applications. ----

def _keras_layers(model):
  """The Keras model's conv, BatchNorm and dense layers in forward order."""
  kinds = ("Conv2D", "DepthwiseConv2D", "BatchNormalization", "Dense")
  return [layer for layer in model.layers if type(layer).__name__ in kinds]


def from_keras(model, template) -> tuple[dict, bool]:
  """A Keras model -> ({'params', 'batch_stats'} shaped like `template`, whether it had a head).

  The head is its last layer when that is not a BatchNorm: the reference's Dense or Keras
  applications' 1x1 `conv_preds`; a model built without its top keeps the template's head.
  """
  layers = _keras_layers(model)
  has_head = bool(layers) and type(layers[-1]).__name__ != "BatchNormalization"
  kernels, biases, norms = [], [], []
  for layer in layers[:-1] if has_head else layers:
    kind, weights = type(layer).__name__, [np.asarray(w) for w in layer.get_weights()]
    if kind == "BatchNormalization":
      norms.append(tuple(weights))
    else:
      kernels.append(weights[0].transpose(0, 1, 3, 2) if kind == "DepthwiseConv2D" else weights[0])
      biases.append(weights[1] if len(weights) > 1 else None)
  head = (None, None)
  if has_head:
    kernel, *bias = [np.asarray(w) for w in layers[-1].get_weights()]
    head = (kernel.reshape(-1, kernel.shape[-1]), bias[0] if bias else None)
  tensors = _flax_tensors(template, kernels, norms, biases, head)
  return _finish(template, tensors, headless=not has_head), has_head


def to_keras(variables, model) -> None:
  """Writes {'params', 'batch_stats'} into a Keras model of the same layout (without a top:
  all but the head)."""
  layers = iter(_keras_layers(model))
  for _, params, norm in _layers(variables):
    layer = next(layers, None)
    if layer is None:
      break
    kernel = np.asarray(params["kernel"])
    if type(layer).__name__ == "DepthwiseConv2D":
      kernel = kernel.transpose(0, 1, 3, 2)
    kernel = kernel.reshape(layer.get_weights()[0].shape)  # A 1x1-conv head takes (1, 1, in, out).
    layer.set_weights([kernel, *([np.asarray(params["bias"])] if "bias" in params else [])])
    if norm is not None:
      next(layers).set_weights([np.asarray(norm[k]) for k in _BN_FLAX])


def keras_reference(config):
  """The Keras CIFAR script's model for `config`: Conv2D/DepthwiseConv2D with 'same' padding,
  BatchNormalization with the config's momentum and epsilon, ReLU, a Dense head (logits)."""
  import keras  # pylint: disable=g-import-not-at-top
  from keras import layers  # pylint: disable=g-import-not-at-top
  m = config.model
  width = lambda c: max(1, int(c * m.alpha))
  norm = lambda: layers.BatchNormalization(momentum=m.bn_momentum, epsilon=m.bn_epsilon)
  relu = lambda: layers.ReLU(6.0 if m.activation == "relu6" else None)
  size = config.input.image_size
  inputs = keras.Input((size, size, 3))
  x = layers.Conv2D(width(32), 3, strides=m.stem_stride, padding="same", use_bias=m.use_bias)(inputs)
  x = relu()(norm()(x))
  for i, (features, strides) in enumerate(models.BLOCKS):
    if m.shallow and i in models.SHALLOW_DROPPED:
      continue
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=m.use_bias)(x)
    x = relu()(norm()(x))
    x = layers.Conv2D(width(features), 1, padding="same", use_bias=m.use_bias)(x)
    x = relu()(norm()(x))
  return keras.Model(inputs, layers.Dense(m.num_classes)(layers.GlobalAveragePooling2D()(x)))


def keras_app(alpha: float, image_size: int, include_top: bool = True, weights=None,
              classes: int = 1000):
  """Keras applications' MobileNet returning logits; `weights`: None, 'imagenet' (Keras
  downloads the checkpoint of this alpha and size) or a file."""
  import keras  # pylint: disable=g-import-not-at-top
  try:
    return keras.applications.MobileNet(
        input_shape=(image_size, image_size, 3), alpha=alpha, include_top=include_top,
        weights=weights, classes=classes, classifier_activation=None)
  except Exception as e:  # pylint: disable=broad-except
    if weights == "imagenet" and not isinstance(e, ValueError):  # get_file's bare Exception.
      raise errors.FileError(
          f"Keras could not download the checkpoint ({_first_line(e)}): download "
          "mobilenet_ALPHA_SIZE_tf[_no_top].h5 elsewhere and pass it as --file.") from e
    if not isinstance(e, ValueError):
      raise
    what = f"alpha={alpha}, image_size={image_size}, include_top={include_top}"
    raise errors.FileError(
        f"{weights}: not Keras applications' MobileNet at {what} (Keras: "
        f"{_first_line(e)}). Pass the --alpha, --image_size and --include_top of "
        "the file (mobilenet_ALPHA_SIZE_tf[_no_top].h5).") from e


def _first_line(error) -> str:
  return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ---- A workdir from converted weights, and weights from a workdir. ----

DEFAULT_CONFIGS = {"keras": "configs/cifar.py", "torch": "configs/cifar.py:torch",
                   "keras_app": "configs/imagenet.py:keras", "timm": "configs/imagenet.py:timm"}
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                  "truck")


def imagenet_labels(style: str) -> tuple[str, ...]:
  """ImageNet's 1000 class names as each source names them: 'keras' (decode_predictions: the
  first WordNet lemma, spaces as underscores) or 'timm' (ImageNetInfo: all lemmas)."""
  path = os.path.join(os.path.dirname(__file__), "imagenet_classes.tsv")
  with open(path, encoding="utf-8") as f:
    lemmas = [line.rstrip("\n").split("\t")[1] for line in f]
  if style == "keras":
    return tuple(lemma.split(", ")[0].replace(" ", "_") for lemma in lemmas)
  return tuple(lemmas)


def default_labels(fmt: str, num_classes: int) -> tuple[str, ...]:
  if num_classes == 1000 and fmt in ("keras_app", "timm"):
    return imagenet_labels("keras" if fmt == "keras_app" else "timm")
  if num_classes == 10:
    return CIFAR10_LABELS
  return tuple(f"class_{i}" for i in range(num_classes))


def template_variables(config) -> dict:
  """Host arrays {'params', 'batch_stats'} of the configured model, for the from_* functions."""
  import jax  # pylint: disable=g-import-not-at-top
  model = models.create_model(config.model)
  return jax.tree.map(np.asarray, models.init_variables(model, sampler.init_key(config.seed),
                                                        config.input.image_size))


def write_workdir(config, variables, workdir: str, label_names) -> None:
  """A step-0 checkpoint of `variables` with config.json and label names, as run.py leaves them."""
  import jax  # pylint: disable=g-import-not-at-top
  if os.path.exists(workdirs.checkpoint_dir(workdir)):
    raise errors.ConfigError(f"--workdir={workdir} already holds checkpoints: pass a new folder.")
  state = checkpoints.state_template(config).replace(params=variables["params"],
                                                     batch_stats=variables["batch_stats"])
  os.makedirs(workdir, exist_ok=True)
  with workdirs.lock(workdir):
    checkpointer = checkpoints.Checkpointer(workdirs.checkpoint_dir(workdir),
                                           config.checkpoint.keep, writer=True)
    try:
      checkpointer.save(jax.device_get(state))
    finally:
      checkpointer.close()
    workdirs.write_config(workdir, config)
    workdirs.save_label_names(workdir, label_names)


def read(fmt: str, file, config, include_top: bool = True) -> tuple[dict, bool]:
  """({'params', 'batch_stats'} for `config`'s model, whether `file` had a head) from `file` in
  format `fmt` (keras_app with no file: Keras' download for config.model.alpha and image_size)."""
  template = template_variables(config)
  if fmt in ("torch", "timm"):
    return from_torch(read_state_dict(file), template), True
  if fmt == "keras":
    import keras  # pylint: disable=g-import-not-at-top
    model = keras.models.load_model(file, compile=False)
  else:
    model = keras_app(config.model.alpha, config.input.image_size, include_top, file or "imagenet",
                      classes=config.model.num_classes)
  return from_keras(model, template)


def write(fmt: str, variables, config, out: str) -> None:
  """The weights as a file the reference of `fmt` loads: a Keras model file (.keras, .h5) or a
  state_dict (.safetensors, else torch.save)."""
  if fmt in ("torch", "timm"):
    write_state_dict(to_torch(variables, fmt), out)
    return
  model = (keras_reference(config) if fmt == "keras" else
           keras_app(config.model.alpha, config.input.image_size, classes=config.model.num_classes))
  to_keras(variables, model)
  model.save(out)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # JAX logs its backend search, orbax each save, at INFO.
  f = flags.FLAGS
  try:
    if f.out:
      trained = workdirs.load(f.workdir, f.raw)
      write(f.format, trained.variables, trained.config, f.out)
      print(f"Wrote {f.out} from {f.workdir}.", flush=True)
      return 0
    config = config_lib.from_flags(DEFAULT_CONFIGS[f.format])
    if f.format == "keras_app":
      config.model.alpha, config.input.image_size = f.alpha, f.image_size
    if not f.file and f.format != "keras_app":
      raise errors.ConfigError(f"--format={f.format} reads --file: pass the checkpoint file.")
    if f.file and not os.path.isfile(f.file):
      raise errors.FileError(f"--file={f.file}: no such file.")
    variables, has_head = read(f.format, f.file, config, f.include_top)
    if not has_head:
      print(f"{f.file or 'The download'} has no top: the head ({config.model.num_classes} "
            "classes) is initialized at random, for fine-tuning.", flush=True)
    write_workdir(config, variables, f.workdir,
                  default_labels(f.format, config.model.num_classes))
  except errors.UserError as e:
    print(f"error: {_first_line(e)}", file=sys.stderr)
    return 1
  print(f"Wrote {f.workdir}: `python -m mobilenet_jax.predict --workdir={f.workdir} IMAGE` "
        "classifies with it.", flush=True)
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("config", None, "The layout's config file and preset, --config.FIELD=VALUE "
                      f"overriding a field; default: the format's own ({DEFAULT_CONFIGS}).")
  flags.DEFINE_enum("format", None, list(DEFAULT_CONFIGS), "The checkpoint's format.",
                    required=True)
  flags.DEFINE_string("file", None, "The checkpoint file to read (keras_app: omit to download).")
  flags.DEFINE_string("out", None, "Write --workdir's weights to this file in --format instead.")
  flags.DEFINE_string("workdir", None, "Where to write (or with --out, read) the workdir.",
                      required=True)
  flags.DEFINE_float("alpha", 1.0, "keras_app: the width multiplier (0.25, 0.5, 0.75, 1.0).")
  flags.DEFINE_integer("image_size", 224, "keras_app: the input size (128, 160, 192, 224).")
  flags.DEFINE_bool("include_top", True, "keras_app: whether the file has the 1000-class head.")
  flags.DEFINE_bool("raw", False, "With --out: " + workdirs.RAW_FLAG_HELP)
  app.run(main, flags_parser=config_lib.parse_flags)
