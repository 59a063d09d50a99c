"""The Keras and PyTorch CIFAR references: same logits from the same weights, both ways.

Each reference model is built here as its script builds it, given random weights and
random, non-trivial BatchNorm statistics, saved and loaded as a user would, converted,
and run on the same random images; then this project's weights go back into a fresh
reference model. Logits must agree within 1e-5 of the largest |logit|.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar
from mobilenet_jax import convert, models

RTOL_OF_MAX = 1e-5


def _jax_model(preset, **overrides):
  config = cifar.get_config(preset)
  config.model.update(overrides)
  model = models.create_model(config.model)
  template = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
  return model, jax.tree.map(np.asarray, template)


def _logits(model, variables, images):
  return np.asarray(model.apply(variables, jnp.asarray(images), train=False))


def _assert_close(actual, expected):
  bound = RTOL_OF_MAX * float(np.abs(expected).max())
  assert float(np.abs(actual - expected).max()) <= bound, (np.abs(actual - expected).max(), bound)
  assert np.abs(expected).max() > 1e-3  # Not a degenerate network.


def _images(n=4, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)


# ---- Keras: the reference script's model (padding='same', BatchNormalization() defaults). ----

def _keras_reference(alpha, shallow=False, num_classes=10):
  import keras  # pylint: disable=g-import-not-at-top
  from keras import layers  # pylint: disable=g-import-not-at-top
  inputs = keras.Input((32, 32, 3))
  x = layers.Conv2D(int(32 * alpha), 3, strides=2, padding="same")(inputs)
  x = layers.ReLU()(layers.BatchNormalization()(x))
  for i, (features, strides) in enumerate(models.BLOCKS):
    if shallow and i in models.SHALLOW_DROPPED:
      continue
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same")(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Conv2D(int(features * alpha), 1, padding="same")(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
  logits = layers.Dense(num_classes)(layers.GlobalAveragePooling2D()(x))
  return keras.Model(inputs, logits)  # The script adds a softmax: no weights.


def _randomize_keras_batchnorm(model, seed=0):
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if type(layer).__name__ == "BatchNormalization":
      c = layer.get_weights()[0].shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.2, c), rng.normal(0, 0.2, c),
                         rng.uniform(0.5, 2.0, c)])


@pytest.mark.parametrize("conv", ["lax", "shifted"])
@pytest.mark.parametrize("alpha, shallow", [(0.25, False), (0.5, True)])
def test_keras_reference_file_converts_to_the_same_logits_and_back(tmp_path, conv, alpha,
                                                                   shallow):
  import keras  # pylint: disable=g-import-not-at-top
  reference = _keras_reference(alpha, shallow)
  _randomize_keras_batchnorm(reference)
  reference.save(tmp_path / "mobilenet.h5")
  loaded = keras.models.load_model(tmp_path / "mobilenet.h5")
  model, template = _jax_model("", alpha=alpha, shallow=shallow, conv=conv)
  variables = convert.from_keras(loaded, template)
  images = _images()
  expected = np.asarray(reference(images))
  _assert_close(_logits(model, variables, images), expected)

  back = _keras_reference(alpha, shallow)
  convert.to_keras(variables, back)
  _assert_close(np.asarray(back(images)), expected)


def test_the_default_layout_is_what_makes_keras_agree():
  """Symmetric padding and PyTorch's BatchNorm epsilon (the old default) do not agree."""
  reference = _keras_reference(0.25)
  _randomize_keras_batchnorm(reference)
  model, template = _jax_model("", alpha=0.25, padding="symmetric", bn_epsilon=1e-5)
  images = _images()
  expected = np.asarray(reference(images))
  actual = _logits(model, convert.from_keras(reference, template), images)
  assert np.abs(actual - expected).max() > 10 * RTOL_OF_MAX * np.abs(expected).max()


# ---- PyTorch: kuangliu/pytorch-cifar's MobileNet, the PyTorch CIFAR reference. ----

def _torch_reference(alpha=1.0):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    def __init__(self, in_planes, out_planes, stride=1):
      super().__init__()
      self.conv1 = nn.Conv2d(in_planes, in_planes, kernel_size=3, stride=stride, padding=1,
                             groups=in_planes, bias=False)
      self.bn1 = nn.BatchNorm2d(in_planes)
      self.conv2 = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, padding=0,
                             bias=False)
      self.bn2 = nn.BatchNorm2d(out_planes)

    def forward(self, x):
      return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))

  class MobileNet(nn.Module):
    def __init__(self, num_classes=10):
      super().__init__()
      self.conv1 = nn.Conv2d(3, int(32 * alpha), kernel_size=3, stride=1, padding=1, bias=False)
      self.bn1 = nn.BatchNorm2d(int(32 * alpha))
      layers, in_planes = [], int(32 * alpha)
      for features, stride in models.BLOCKS:
        layers.append(Block(in_planes, int(features * alpha), stride))
        in_planes = int(features * alpha)
      self.layers = nn.Sequential(*layers)
      self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
      out = self.layers(F.relu(self.bn1(self.conv1(x))))
      return self.linear(F.avg_pool2d(out, 2).view(x.shape[0], -1))

  torch.manual_seed(0)
  model = MobileNet()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        for t, (lo, hi) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.3, 0.3)),
                            (m.running_mean, (-0.3, 0.3)), (m.running_var, (0.5, 2.0))):
          t.uniform_(lo, hi)
  return model.eval()


def _torch_logits(model, images):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


@pytest.mark.parametrize("conv", ["lax", "shifted"])
def test_pytorch_reference_state_dict_converts_to_the_same_logits_and_back(tmp_path, conv):
  import torch  # pylint: disable=g-import-not-at-top
  reference = _torch_reference(alpha=0.25)
  torch.save(reference.state_dict(), tmp_path / "ckpt.pth")
  state_dict = {k: v.numpy() for k, v in torch.load(tmp_path / "ckpt.pth").items()}
  model, template = _jax_model("torch", alpha=0.25, conv=conv)
  variables = convert.from_torch(state_dict, template)
  images = _images()
  expected = _torch_logits(reference, images)
  _assert_close(_logits(model, variables, images), expected)

  back = _torch_reference(alpha=0.25)
  back.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                        convert.to_torch(variables).items()}, strict=True)
  _assert_close(_torch_logits(back.eval(), images), expected)


def test_a_mismatched_state_dict_names_the_first_bad_tensor():
  state_dict = {k: v.numpy() for k, v in _torch_reference(alpha=0.25).state_dict().items()}
  _, template = _jax_model("torch", alpha=0.5)
  with pytest.raises(ValueError, match=r"params/block1/depthwise/bn/bias: the checkpoint's "
                                       r"tensor has shape \(8,\), the configured model expects "
                                       r"\(16,\)"):
    convert.from_torch(state_dict, template)
  _, template = _jax_model("torch", alpha=0.25)
  missing = {k: v for k, v in state_dict.items() if k != "linear.bias"}
  with pytest.raises(ValueError, match=r"no tensor for params/head/bias \(expected shape \(10,\)"):
    convert.from_torch(missing, template)
  _, with_bias = _jax_model("torch", alpha=0.25, use_bias=True)
  with pytest.raises(ValueError, match="no tensor for params/block1/depthwise/conv/bias"):
    convert.from_torch(state_dict, with_bias)
  _, shallow = _jax_model("torch", alpha=0.25, shallow=True)
  with pytest.raises(ValueError, match="has 27 convolutions and 27 BatchNorms; the configured "
                                       "model has 17"):
    convert.from_torch(state_dict, shallow)


def test_the_cli_writes_a_workdir_that_predict_reads_with_the_reference_logits(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import inference  # pylint: disable=g-import-not-at-top
  reference = _torch_reference(alpha=0.25)
  torch.save({"net": reference.state_dict(), "acc": 0.0}, tmp_path / "ckpt.pth")
  convert_cli = [sys.executable, "-m", "mobilenet_jax.convert", "--config=configs/cifar.py:torch",
                 "--config.model.alpha=0.25", f"--torch_file={tmp_path / 'ckpt.pth'}"]
  result = subprocess.run([*convert_cli, f"--workdir={tmp_path / 'run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  trained = inference.load(str(tmp_path / "run"))
  assert trained.step == 0 and trained.label_names[0] == "airplane"
  images = _images()
  _assert_close(_logits(trained.model, trained.variables, images),
                _torch_logits(reference, images))

  bad = subprocess.run([*convert_cli, "--config.model.alpha=0.5",
                        f"--workdir={tmp_path / 'bad'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False)
  assert bad.returncode != 0 and "the configured model expects (16,)" in bad.stderr
  assert not (tmp_path / "bad").exists()  # Nothing written.
