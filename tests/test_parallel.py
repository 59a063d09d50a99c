"""Data parallelism: jit over an 8-device mesh and pmap equal one device with the same global batch.

Evaluation runs in sub-batches of 8 images (2 per 16-image batch), and the final one with
test-time flips and translations, so the test also checks that chunked inference over
stacked views gives the same metrics on a sharded batch.

Each run is a separate process (`run.py` on mock data), since the number of
simulated CPU devices is fixed when JAX starts.
"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import EVERY_AUGMENTATION, ROOT, restore_latest, run_mocked

pytestmark = pytest.mark.slow  # Trains, or launches processes: `-m 'not slow'` skips it.

EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
# Batch sums run in a different order on 8 devices, so float32 results differ by ~1e-7 after
# one step. The shallow 32x32 stem-stride-1 network is used because the 16x16 smoke network,
# whose last feature maps are 1x1 with batch 16, has exploding gradients at init and amplifies
# that rounding noise by ~10x per step. Even this one, with alternating flips and cutout,
# amplified it ~100x in the third step on one machine (1e-7, 6e-7, 6e-5 after steps 1-3), so
# the runs stop after two.
RTOL, ATOL = 1e-5, 1e-6
WELL_CONDITIONED = ["--config.model.shallow=True", "--config.input.image_size=32",
                    "--config.model.stem_stride=1"]


def test_jit_mesh_and_pmap_on_8_devices_equal_one_device(tmp_path):
  common = ["--config=configs/cifar.py:smoke", "--config.data.download=False",
            "--config.num_epochs=1", "--config.data.train_examples=32",
            "--config.log.progress_bar=False", "--config.eval.chunk=8", "--config.eval.flip=True",
            "--config.eval.shift=2", *WELL_CONDITIONED,
            *(f"--config.{k}={v}" for k, v in EVERY_AUGMENTATION.items())]
  runs = {"one": ({}, "jit"), "jit8": (EIGHT_DEVICES, "jit"), "pmap8": (EIGHT_DEVICES, "pmap")}
  for name, (env, mode) in runs.items():
    result = run_mocked(*common, f"--workdir={tmp_path / name}", f"--config.parallel={mode}",
                        env=env)
    assert result.returncode == 0, result.stderr[-3000:]
  from configs import cifar  # pylint: disable=g-import-not-at-top
  config = cifar.get_config("smoke")
  config.model.update(shallow=True, stem_stride=1)
  config.input.image_size = 32
  results = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in runs}
  for name in ("jit8", "pmap8"):
    assert results[name]["test_examples"] == results["one"]["test_examples"] == 40
    np.testing.assert_allclose(results[name]["test_loss"], results["one"]["test_loss"], rtol=RTOL)
  ref = restore_latest(tmp_path / "one", config)
  assert int(ref.step) == 2
  for name in ("jit8", "pmap8"):
    state = restore_latest(tmp_path / name, config)
    assert int(state.step) == 2
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params)):
      np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=name)


# One train step with dropout from one state on one batch, by each runner on 8 devices, whole
# and in 2 micro-batches, with a weight average; and the dropout masks alone: printed for the
# test to compare.
_DROPOUT_STEPS = """
import json, sys
import jax, numpy as np
from configs import cifar
from mobilenet_jax import input_pipeline, models, optimizers, parallel, steps
config = cifar.get_config("smoke")
config.model.update(dropout=0.5, shallow=True, stem_stride=1)  # WELL_CONDITIONED.
config.input.image_size = 32
config.ema.decay = 0.5
rng = np.random.default_rng(0)
split = input_pipeline.Split(rng.integers(0, 256, (64, 32, 32, 3), np.uint8),
                             rng.integers(0, 10, (64,), np.int32))
params = {}
for mode, k in [(m, k) for m in ("jit", "pmap") for k in (1, 2)]:
  config.parallel, config.optim.micro_batches = mode, k
  runner = parallel.create_runner(config, 64)
  state = runner.put_state(steps.create_train_state(
      models.create_model(config.model, axis_name=runner.axis_name),
      optimizers.create_optimizer(config, 4), jax.random.key(0), 32, ema=True))
  state, _ = runner.train(state, runner.put_train_data(split), runner.shuffle(state))
  state = runner.get_state(state)
  params[f"{mode}{k}"] = [np.asarray(x).tolist() for x in
                          jax.tree.leaves((state.params, state.batch_stats, state.ema))]
dropout = lambda axis, rows: models.Dropout(0.5, axis).apply(
    {}, np.ones((rows, 64), np.float32), True, rngs={"dropout": jax.random.key(3)})
masks = {"one": np.asarray(jax.jit(lambda: dropout(None, 16))()).tolist(),
         "pmap": np.asarray(jax.pmap(lambda _: dropout("d", 2), axis_name="d")(np.arange(8))
                            ).reshape(16, 64).tolist()}
print(json.dumps({"params": params, "masks": masks}))
"""


def test_under_pmap_each_device_drops_what_one_device_would_drop_of_the_whole_batch():
  # And takes its share of each micro-batch (steps.py): pmap's micro-batches are jit's.
  result = subprocess.run([sys.executable, "-c", _DROPOUT_STEPS], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, **EIGHT_DEVICES})
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.splitlines()[-1])
  masks = {k: np.asarray(v) for k, v in out["masks"].items()}
  assert set(np.unique(masks["one"])) == {0.0, 2.0}  # Kept values scaled by 1 / (1 - 0.5).
  np.testing.assert_array_equal(masks["pmap"], masks["one"])
  for k in (1, 2):  # Rounding apart: equal (params, BatchNorm statistics, weight average).
    for a, b in zip(out["params"][f"pmap{k}"], out["params"][f"jit{k}"]):
      np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
  assert not np.allclose(out["params"]["jit1"][0], out["params"]["jit2"][0])
