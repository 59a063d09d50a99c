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
