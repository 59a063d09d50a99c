"""Shared fixtures: tfds mock data (random CIFAR-shaped images) and the smoke config."""
import fcntl
import os
import pathlib
import socket
import subprocess
import sys
import time

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
  import mock_run  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=mock_run.NUM_EXAMPLES):
    yield


@pytest.fixture
def smoke_config():
  from configs import cifar  # pylint: disable=g-import-not-at-top
  config = cifar.get_config("smoke")
  config.data.download = False
  config.log.progress_bar = False
  return config


def fresh_state(config, steps_per_epoch=4):
  """A newly initialized TrainState of `config` (seed 0), its schedule at `steps_per_epoch`."""
  import jax  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import models, optimizers, steps  # pylint: disable=g-import-not-at-top
  return steps.create_train_state(models.create_model(config.model),
                                  optimizers.create_optimizer(config, steps_per_epoch),
                                  jax.random.key(0), config.input.image_size,
                                  ema=config.ema.decay > 0)


def random_batch(config, n=16, size=32, seed=0):
  """Random uint8 images and labels, with augmentation draws as the sampler gives them."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import sampler  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return {"image": jax.numpy.asarray(rng.integers(0, 256, (n, size, size, 3), np.uint8)),
          "label": jax.numpy.asarray(rng.integers(0, 10, (n,), np.int32)),
          **sampler.augmentation_draws(jax.random.key(seed), n, config.augment.crop_padding,
                                       config.augment.cutout)}


def inference_logits(model, variables, images):
  """`model`'s logits on float `images` in inference mode, compiled whole (op by op, a
  full-size network takes tens of seconds); a numpy array."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.asarray(jax.jit(functools.partial(model.apply, train=False))(
      variables, jax.numpy.asarray(images)))


def assert_same_state(a, b):
  """Two TrainStates equal bit for bit: step, params, BatchNorm statistics, optimizer state
  and weight average."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert int(a.step) == int(b.step)
  assert jax.tree.structure(a.ema) == jax.tree.structure(b.ema)
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state, a.ema)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state, b.ema))):
    np.testing.assert_array_equal(x, y)


def restore_latest(workdir, config):
  """The latest checkpoint's TrainState in `workdir` (trained with `config`)."""
  from mobilenet_jax import checkpoints, workdirs  # pylint: disable=g-import-not-at-top
  checkpointer = checkpoints.Checkpointer(workdirs.checkpoint_dir(str(workdir)), 100)
  try:
    return checkpointer.restore(checkpoints.state_template(config))
  finally:
    checkpointer.close()


def smoke_args(workdir, *flags):
  """run.py's flags for the smoke preset on tfds mock data in `workdir`, then `flags`."""
  return ["--config=configs/cifar.py:smoke", "--config.data.download=False",
          "--config.log.progress_bar=False", f"--workdir={workdir}", *flags]


# Every on-device augmentation, for the tests that hold runs equal across inputs, resumes and
# devices: RandAugment, translation, flip (alternating: it reads the example indices), cutout,
# random erasing with per-pixel noise, Mixup and CutMix per element.
EVERY_AUGMENTATION = {"augment.randaugment": "rand-m9-mstd0.5-inc1",
                      "augment.alternate_flips": True, "augment.cutout": 4,
                      "augment.erase_prob": 0.5, "augment.erase_mode": "pixel",
                      "augment.mixup_alpha": 0.8, "augment.cutmix_alpha": 1.0,
                      "augment.mix_mode": "elem"}

# The shared `trained_workdir`'s fields beyond the smoke preset's: a test that retrains it to
# compare sets them too (`trained_args`, or its config updated with them).
TRAINED_OVERRIDES = {"ema.decay": 0.5, "log.profile_steps": (2, 4)}


def trained_args(workdir, *flags):
  """`smoke_args` for the run of `trained_workdir`, then `flags`."""
  return smoke_args(workdir, *(f"--config.{k}={v}" for k, v in TRAINED_OVERRIDES.items()),
                    *flags)


def _mocked_command(args, env):
  """run.py's command line as the tests launch it (`mock_run.py`), and its environment."""
  return ([sys.executable, str(ROOT / "tests" / "mock_run.py"), *args],
          {**os.environ, **(env or {})})


def run_mocked(*args, env=None, timeout=600):
  """Runs `run.py` in a fresh process (tfds datasets mocked); returns the CompletedProcess."""
  cmd, full_env = _mocked_command(args, env)
  return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                        timeout=timeout, check=False)


def start_mocked(*args, log, env=None):
  """Starts `run.py` (tfds datasets mocked) in the background, its stdout and stderr to the
  file `log` (a pipe left unread would fill and block it); returns the Popen."""
  cmd, full_env = _mocked_command(args, env)
  with open(log, "w", encoding="utf-8") as out:
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_processes(common, workdir, *args, num_processes=2, process_ids=None, per_process=None):
  """Starts the processes of one multi-host run.py run, one CPU device each, on localhost:
  `common` then `args` flags (`process_ids`: only these processes; `per_process[i]`: extra
  flags of process i). Returns (Popen, log path) pairs."""
  port = _free_port()
  runs = []
  for i in range(num_processes) if process_ids is None else process_ids:
    log = f"{workdir}.{port}.{i}.log"  # One per launch: a rerun keeps the first's.
    runs.append((start_mocked(*common, f"--workdir={workdir}", "--config.distributed.enabled=True",
                              f"--config.distributed.coordinator_address=localhost:{port}",
                              f"--config.distributed.num_processes={num_processes}",
                              f"--config.distributed.process_id={i}", *args,
                              *(per_process[i] if per_process else []), log=log,
                              env={"XLA_FLAGS": ""}), log))
  return runs


def wait_all(runs, timeout):
  """Each process's exit code ('timeout': killed after `timeout` s in all) and output."""
  deadline = time.time() + timeout
  codes = []
  for proc, _ in runs:
    try:
      codes.append(proc.wait(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      proc.kill()
      codes.append("timeout")
  return codes, [open(log, encoding="utf-8").read() for _, log in runs]


def wait_for_checkpoint(runs, workdir, step, timeout=300):
  """Returns once the running processes have saved the checkpoint at `step`; else kills them
  (left running, they would slow every test after) and fails."""
  deadline = time.time() + timeout
  while not (workdir / "checkpoints" / str(step)).exists():
    if not all(proc.poll() is None for proc, _ in runs) or time.time() > deadline:
      for proc, _ in runs:
        proc.kill()
      pytest.fail(f"no checkpoint at step {step} in {workdir} within {timeout} s, or a process "
                  f"exited: {[proc.poll() for proc, _ in runs]}")
    time.sleep(0.05)


def claim_lock(workdir, host, pid, age_s=0.0, pids=None):
  """A workdir lock file as a run of `pid` on `host` (seeing the `pids` namespace; by default
  this process's) leaves it, last touched `age_s` ago; returns its path."""
  import json  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import workdirs  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir) / workdirs.LOCK_FILE
  pids = pids or os.readlink("/proc/self/ns/pid")
  path.write_text(json.dumps({"host": host, "pid": pid, "pids": pids, "token": "theirs",
                              "since": "2026-12-04 08:00:00 UTC"}))
  os.utime(path, (time.time() - age_s,) * 2)
  return path


def latest_step(workdir):
  from mobilenet_jax import checkpoints, workdirs  # pylint: disable=g-import-not-at-top
  checkpointer = checkpoints.Checkpointer(workdirs.checkpoint_dir(str(workdir)), 100)
  try:
    return checkpointer.latest_step()
  finally:
    checkpointer.close()


def make_image_folder(root, num_classes=3, per_class=20, seed=0):
  """`per_class` JPEGs of 24-64 pixels a side in each of `num_classes` class folders of
  `root`, each class its own hue over noise (learnable in a few steps); returns `root`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for c in range(num_classes):
    folder = pathlib.Path(root) / f"class_{c}"
    folder.mkdir(parents=True, exist_ok=True)
    colour = np.asarray([255 * (c == k % 3) for k in range(3)]) * (0.5 + 0.5 * (c // 3 % 2))
    for i in range(per_class):
      h, w = rng.integers(24, 65, 2)
      image = 0.6 * colour + 0.4 * rng.integers(0, 256, (h, w, 3))
      Image.fromarray(image.astype(np.uint8)).save(folder / f"{i:04d}.jpg", quality=90)
  return root


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory, worker_id):
  """One smoke training (2 epochs, 8 steps, `TRAINED_OVERRIDES`) by run.py for the whole session,
  every xdist worker included, for the tests that only read it; its stdout is in
  `trained.stdout` beside it."""
  # Under xdist each worker has its own basetemp in the session's folder: they meet in that one.
  root = tmp_path_factory.getbasetemp()
  root = root if worker_id == "master" else root.parent
  workdir = root / "trained"
  with open(root / "trained.lock", "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # The first worker trains; the other waits, then reads.
    if not (workdir / "results.json").exists():
      result = run_mocked(*trained_args(workdir))
      assert result.returncode == 0, result.stderr[-3000:]
      (root / "trained.stdout").write_text(result.stdout)
  return workdir
