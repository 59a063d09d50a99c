"""Every reference and public checkpoint format: same logits from the same weights, both ways.

The Keras and PyTorch CIFAR scripts, Keras applications' MobileNet and timm's mobilenetv1_100:
each reference model is built here (as its script builds it, or by its library with random
weights), given random weights and
random, non-trivial BatchNorm statistics, saved and loaded as a user would, converted,
and run on the same random images; then this project's weights go back into a fresh
reference model. Logits must agree within 1e-5 of the largest |logit|.
"""
import functools

import jax
import numpy as np
import pytest

from configs import cifar
from conftest import inference_logits
from mobilenet_jax import convert, models

pytestmark = pytest.mark.slow  # Trains, or launches processes: `-m 'not slow'` skips it.

RTOL_OF_MAX = 1e-5


def _jax_model(preset, **overrides):
  config = cifar.get_config(preset)
  config.model.update(overrides)
  model = models.create_model(config.model)
  return model, jax.tree.map(np.asarray, models.init_variables(model, jax.random.key(1), 32))


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
  variables, has_head = convert.from_keras(loaded, template)
  assert has_head
  images = _images()
  expected = np.asarray(reference(images))
  _assert_close(inference_logits(model, variables, images), expected)

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
  actual = inference_logits(model, convert.from_keras(reference, template)[0], images)
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
  _assert_close(inference_logits(model, variables, images), expected)

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
  with pytest.raises(ValueError, match=r"has 27 convolutions and 27 BatchNorms; the configured "
                                       r"model has 17 .*the first that differs: params/block12/"
                                       r"pointwise/conv/kernel has shape \(1, 1, 128, 128\), "
                                       r"expected \(1, 1, 128, 256\)"):
    convert.from_torch(state_dict, shallow)


def test_the_cli_writes_a_workdir_that_predict_reads_with_the_reference_logits(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from conftest import ROOT  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import workdirs  # pylint: disable=g-import-not-at-top
  reference = _torch_reference(alpha=0.25)
  torch.save({"net": reference.state_dict(), "acc": 0.0}, tmp_path / "ckpt.pth")
  convert_cli = [sys.executable, "-m", "mobilenet_jax.convert", "--format=torch",
                 "--config=configs/cifar.py:torch", "--config.model.alpha=0.25",
                 f"--file={tmp_path / 'ckpt.pth'}"]
  result = subprocess.run([*convert_cli, f"--workdir={tmp_path / 'run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  trained = workdirs.load(str(tmp_path / "run"))
  assert trained.step == 0 and trained.label_names[0] == "airplane"
  images = _images()
  _assert_close(inference_logits(trained.model, trained.variables, images),
                _torch_logits(reference, images))

  bad = subprocess.run([*convert_cli, "--config.model.alpha=0.5",
                        f"--workdir={tmp_path / 'bad'}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False)
  assert bad.returncode != 0 and "the configured model expects (16,)" in bad.stderr
  assert "Traceback" not in bad.stderr, bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: params/block1"), bad.stderr
  assert not (tmp_path / "bad").exists()  # Nothing written.


# ---- Keras applications' MobileNet (ReLU6, no biases, TF padding, a 1x1-conv head). ----

def _imagenet_config(layout, **model):
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config(layout)
  config.model.update(model)
  return config


def _keras_app(alpha, size, include_top=True, weights=None, seed=0):
  import keras  # pylint: disable=g-import-not-at-top
  model = keras.applications.MobileNet(input_shape=(size, size, 3), alpha=alpha,
                                       include_top=include_top, weights=weights,
                                       classifier_activation=None)
  if weights is None:
    _randomize_keras_batchnorm(model, seed)
  return model


def _unit_images(size, n=2, seed=0):
  """Images as Keras' and timm's preprocessing leave them: pixels in [-1, 1]."""
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("alpha, size", [(0.25, 128), (0.5, 160)])
def test_keras_applications_file_converts_to_the_same_logits_and_back(tmp_path, alpha, size):
  reference = _keras_app(alpha, size)
  reference.save(tmp_path / "mobilenet.h5")  # Weights as keras.applications loads them.
  config = _imagenet_config("keras", alpha=alpha)
  variables, has_head = convert.read("keras_app", str(tmp_path / "mobilenet.h5"), config)
  assert has_head
  images = _unit_images(size)
  expected = np.asarray(reference(images))
  model = models.create_model(config.model)
  _assert_close(inference_logits(model, variables, images), expected)

  config.input.image_size = size
  convert.write("keras_app", variables, config, str(tmp_path / "back.h5"))
  back = _keras_app(alpha, size, weights=str(tmp_path / "back.h5"))
  _assert_close(np.asarray(back(images)), expected)


def test_keras_applications_without_top_keeps_a_fresh_head(tmp_path):
  reference = _keras_app(0.25, 128, include_top=False)
  reference.save(tmp_path / "no_top.h5")
  config = _imagenet_config("keras,cifar10", alpha=0.25)
  template = convert.template_variables(config)
  variables, has_head = convert.read("keras_app", str(tmp_path / "no_top.h5"), config,
                                     include_top=False)
  assert not has_head
  images = _unit_images(128)
  head = template["params"]["head"]
  expected = np.asarray(reference(images)).mean((1, 2)) @ head["kernel"] + head["bias"]
  _assert_close(inference_logits(models.create_model(config.model), variables, images), expected)


def test_a_keras_applications_file_of_another_alpha_or_top_is_named(tmp_path):
  _keras_app(0.25, 128).save(tmp_path / "mobilenet.h5")
  config = _imagenet_config("keras", alpha=0.5)
  with pytest.raises(ValueError, match=r"not Keras applications' MobileNet at alpha=0.5.*conv1/"
                                       r"kernel. Weight expects shape \(3, 3, 3, 16\)"):
    convert.read("keras_app", str(tmp_path / "mobilenet.h5"), config)
  with pytest.raises(ValueError, match="include_top=False.*Layer count mismatch"):
    convert.read("keras_app", str(tmp_path / "mobilenet.h5"), _imagenet_config("keras", alpha=0.25),
                 include_top=False)


def test_a_converted_keras_application_predicts_and_exports_with_its_logits(tmp_path):
  import PIL.Image  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import export, images, predict, workdirs  # pylint: disable=g-import-not-at-top
  reference = _keras_app(0.25, 128)
  reference.save(tmp_path / "mobilenet.h5")
  config = _imagenet_config("keras", alpha=0.25)
  config.input.image_size = 128
  variables, _ = convert.read("keras_app", str(tmp_path / "mobilenet.h5"), config)
  workdir = str(tmp_path / "workdir")
  convert.write_workdir(config, variables, workdir, convert.default_labels("keras_app", 1000))
  photo = np.random.default_rng(0).integers(0, 256, (150, 200, 3), np.uint8)
  PIL.Image.fromarray(photo).save(tmp_path / "photo.png")

  # Keras applications' own preprocessing of the fitted image: x / 127.5 - 1.
  fitted = images.fit(photo, workdirs.load(workdir).config).astype(np.float32)
  assert fitted.shape == (128, 128, 3)
  expected = np.asarray(reference(fitted[None] / 127.5 - 1))
  probs = jax.nn.softmax(expected)[0]
  top = predict.predict(workdir, [str(tmp_path / "photo.png")], top=3)[0]
  names = convert.imagenet_labels("keras")
  assert [name for name, _ in top] == [names[i] for i in np.argsort(-probs)[:3]]
  np.testing.assert_allclose([p for _, p in top], np.sort(probs)[::-1][:3], rtol=1e-4)

  out = str(tmp_path / "m.tflite")
  export.export(workdir, "tflite", out)
  interpreter = tf.lite.Interpreter(model_path=out)
  interpreter.allocate_tensors()
  interpreter.set_tensor(interpreter.get_input_details()[0]["index"], fitted[None])
  interpreter.invoke()
  _assert_close(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), expected)


def test_imagenet_class_names_are_timms_and_keras_first_lemmas():
  from timm.data import ImageNetInfo  # pylint: disable=g-import-not-at-top
  info = ImageNetInfo()
  timm_names = convert.imagenet_labels("timm")
  assert timm_names == tuple(info.index_to_description(i) for i in range(1000))
  keras_names = convert.imagenet_labels("keras")
  assert keras_names[:3] == ("tench", "goldfish", "great_white_shark")
  assert keras_names[607] == "jack-o'-lantern" and keras_names[999] == "toilet_tissue"


# ---- timm's mobilenetv1_100 (ReLU6, PyTorch padding and BatchNorm). ----

def _timm_reference(seed=0):
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = timm.create_model("mobilenetv1_100", pretrained=False)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        for t, (lo, hi) in ((m.weight, (0.5, 1.5)), (m.bias, (-0.3, 0.3)),
                            (m.running_mean, (-0.3, 0.3)), (m.running_var, (0.5, 2.0))):
          t.uniform_(lo, hi)
  return model.eval()


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_timm_checkpoint_converts_to_the_same_logits_and_back(tmp_path, suffix):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  reference = _timm_reference()
  path = str(tmp_path / f"model.{suffix}")
  if suffix == "safetensors":
    safetensors.torch.save_file(reference.state_dict(), path)  # As timm's hub files are.
  else:
    torch.save(reference.state_dict(), path)
  config = _imagenet_config("timm")
  variables, _ = convert.read("timm", path, config)
  model = models.create_model(config.model)
  assert sum(np.size(v) for v in jax.tree.leaves(variables["params"])) == sum(
      p.numel() for p in reference.parameters()) == 4_231_976
  images = _unit_images(96)
  expected = _torch_logits(reference, images)
  _assert_close(inference_logits(model, variables, images), expected)

  back_path = str(tmp_path / f"back.{suffix}")
  convert.write("timm", variables, config, back_path)
  back = _timm_reference(seed=1)
  state = (safetensors.torch.load_file(back_path) if suffix == "safetensors" else
           torch.load(back_path))
  back.load_state_dict(state, strict=True)
  _assert_close(_torch_logits(back, images), expected)


def test_safetensors_are_read_without_torch(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  safetensors.torch.save_file(_timm_reference().state_dict(), tmp_path / "model.safetensors")
  code = ("import sys; sys.modules['torch'] = None\n"  # Any import of torch now fails.
          "from mobilenet_jax import convert\n"
          f"state = convert.read_state_dict({str(tmp_path / 'model.safetensors')!r})\n"
          "print(len(state), state['classifier.weight'].shape)")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["164", "(1000,", "1024)"]


def test_a_state_dict_of_another_architecture_is_rejected(tmp_path):
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), tmp_path / "r.pth")
  with pytest.raises(ValueError, match=r"the first that differs: params/stem/conv/kernel has "
                                       r"shape \(3, 3, 3, 24\), expected \(3, 3, 3, 32\)"):
    convert.read("timm", str(tmp_path / "r.pth"), _imagenet_config("timm"))


# ---- Fine-tuning: config.init_from a converted workdir. ----

@pytest.fixture(scope="module")
def converted_workdir(tmp_path_factory):
  """`converted_workdir(num_classes)`: (workdir, variables) of a random-weight Keras reference
  converted for the smoke preset, made once per class count; the tests only read it."""
  @functools.cache
  def make(num_classes=10):
    config = cifar.get_config("smoke")
    config.model.num_classes = num_classes
    reference = _keras_reference(0.25, num_classes=num_classes)
    _randomize_keras_batchnorm(reference)
    variables, _ = convert.from_keras(reference, convert.template_variables(config))
    workdir = str(tmp_path_factory.mktemp("converted"))
    convert.write_workdir(config, variables, workdir, convert.default_labels("keras", num_classes))
    return workdir, variables
  return make


def _fine_tune_start(config):
  from mobilenet_jax import optimizers, steps, workdirs  # pylint: disable=g-import-not-at-top
  model = models.create_model(config.model)
  fresh = steps.create_train_state(model, optimizers.create_optimizer(config, 1),
                                   jax.random.key(config.seed), config.input.image_size)
  return model, fresh, workdirs.start_from(fresh, config)


def test_init_from_starts_from_the_converted_logits(converted_workdir):
  workdir, converted = converted_workdir()
  config = cifar.get_config("smoke")
  config.init_from = workdir
  model, fresh, start = _fine_tune_start(config)
  images = _images(seed=3)[:, :16, :16]
  variables = {"params": start.params, "batch_stats": start.batch_stats}
  np.testing.assert_array_equal(inference_logits(model, variables, images),
                                inference_logits(model, converted, images))
  assert not np.array_equal(inference_logits(model, variables, images),
                            inference_logits(model, {"params": fresh.params,
                                            "batch_stats": fresh.batch_stats}, images))


def test_init_from_another_class_count_starts_a_new_head(converted_workdir, caplog):
  workdir, converted = converted_workdir(num_classes=7)
  config = cifar.get_config("smoke")
  config.init_from = workdir
  with caplog.at_level("INFO"):
    _, fresh, start = _fine_tune_start(config)
  assert "its head (7 classes) is replaced by a new one for 10 classes" in caplog.text
  np.testing.assert_array_equal(start.params["head"]["kernel"], fresh.params["head"]["kernel"])
  np.testing.assert_array_equal(start.params["stem"]["conv"]["kernel"],
                                converted["params"]["stem"]["conv"]["kernel"])
  np.testing.assert_array_equal(start.batch_stats["block13"]["pointwise"]["bn"]["var"],
                                converted["batch_stats"]["block13"]["pointwise"]["bn"]["var"])


def test_init_from_another_layout_names_the_flags_to_pass(converted_workdir):
  workdir, _ = converted_workdir()
  config = cifar.get_config("smoke")
  config.init_from = workdir
  config.model.update(cifar.PYTORCH_LAYOUT)
  with pytest.raises(ValueError, match=r"holds a model of another layout: pass "
                                       r"--config.model.padding='same' "
                                       r"--config.model.bn_epsilon=0.001"):
    _fine_tune_start(config)


def test_fine_tuning_from_a_converted_workdir_runs_the_smoke_preset(tmp_path, converted_workdir):
  from conftest import run_mocked, smoke_args  # pylint: disable=g-import-not-at-top
  workdir, _ = converted_workdir(num_classes=7)
  result = run_mocked(*smoke_args(tmp_path / "tuned", f"--config.init_from={workdir}"))
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "tuned" / "results.json").exists()
