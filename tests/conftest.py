"""Shared fixtures: tfds mock data (random CIFAR-shaped images) and the smoke config."""
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Test processes compile the same smoke-sized programs again and again: share a compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "mobilenet_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # pylint: disable=g-import-not-at-top

try:
  # torch._dynamo (imported by timm through torchvision) segfaults when TensorFlow is already
  # loaded in the process, and loads fine before it: tests use both.
  import timm  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_TFDS = ROOT.parent / "shared" / "tensorflow_datasets"
sys.path.insert(0, str(ROOT))


@pytest.fixture
def mock_tfds():
  """Patches tfds so every split yields 64 random examples with the dataset's real features."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=64):
    yield


@pytest.fixture
def smoke_config():
  from configs import cifar  # pylint: disable=g-import-not-at-top
  config = cifar.get_config("smoke")
  config.download = False
  config.progress_bar = False
  return config


def fresh_state(config, steps_per_epoch=4):
  """A newly initialized TrainState of `config` (seed 0), its schedule at `steps_per_epoch`."""
  import jax  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import models, steps  # pylint: disable=g-import-not-at-top
  return steps.create_train_state(models.create_model(config.model),
                                  steps.create_optimizer(config, steps_per_epoch),
                                  jax.random.key(0), config.image_size)


def random_batch(config, n=16, size=32, seed=0):
  """Random uint8 images and labels, with augmentation draws as the sampler gives them."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import sampler  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return {"image": jax.numpy.asarray(rng.integers(0, 256, (n, size, size, 3), np.uint8)),
          "label": jax.numpy.asarray(rng.integers(0, 10, (n,), np.int32)),
          **sampler.augmentation_draws(jax.random.key(seed), n, config.crop_padding,
                                       config.cutout)}


def restore_latest(workdir, config):
  """The latest checkpoint's TrainState in `workdir` (trained with `config`)."""
  from mobilenet_jax import checkpoints  # pylint: disable=g-import-not-at-top
  checkpointer = checkpoints.Checkpointer(str(workdir), 100)
  try:
    return checkpointer.restore(checkpoints.state_template(config))
  finally:
    checkpointer.close()


def smoke_args(workdir, *flags):
  """run.py's flags for the smoke preset on tfds mock data in `workdir`, then `flags`."""
  return ["--config=configs/cifar.py:smoke", "--config.download=False",
          "--config.progress_bar=False", f"--workdir={workdir}", *flags]


def _mocked_command(args, env):
  return ([sys.executable, str(ROOT / "tests" / "mock_run.py"), *args],
          {**os.environ, **(env or {})})


def run_mocked(*args, env=None, timeout=600):
  """Runs `run.py` in a fresh process on tfds mock data; returns the CompletedProcess."""
  cmd, full_env = _mocked_command(args, env)
  return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def start_mocked(*args, log, env=None):
  """Starts `run.py` on tfds mock data in the background, its stdout and stderr to the file
  `log` (a pipe left unread would fill and block it); returns the Popen."""
  cmd, full_env = _mocked_command(args, env)
  with open(log, "w", encoding="utf-8") as out:
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """One smoke training (2 epochs, 8 steps) by run.py, for the tests that only read it."""
  workdir = tmp_path_factory.mktemp("smoke")
  result = run_mocked(*smoke_args(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir
