"""benchmarks/device_check.py at toy sizes, as a GPU machine runs it: without TensorFlow or tfds,
the CIFAR run from an npz: dataset. The peer: the reference networks, parameter for parameter."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from mobilenet_jax import arrays, input_pipeline


def _blocked_imports(folder):
  """A PYTHONPATH folder whose `tensorflow` and `tensorflow_datasets` fail to import, in every
  process started with it (device_check starts pytest and the peer)."""
  for name in ("tensorflow", "tensorflow_datasets"):
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
  return folder


@pytest.mark.slow
def test_the_check_runs_without_tensorflow_and_writes_its_tables(tmp_path):
  rng = np.random.default_rng(0)
  split = lambda n: input_pipeline.Split(rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                                         rng.integers(0, 10, (n,), np.int32))
  arrays.write(input_pipeline.Dataset(split(64), split(40), 10, tuple("abcdefghij")),
               str(tmp_path / "cifar"), chunk_bytes=40 * 32 * 32 * 3)
  blocked = _blocked_imports(tmp_path / "blocked")
  tests = tmp_path / "test_toy.py"  # Standing in for TESTS: one passes, one fails.
  tests.write_text("def test_passes():\n  assert 1 + 1 == 2\n\n\n"
                   "def test_fails():\n  assert 1 + 1 == 3, 'planted'\n")
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "benchmarks/device_check.py", "--cpu", f"--out={out}",
       f"--dataset=npz:{tmp_path / 'cifar'}", f"--workdir={tmp_path / 'workdir'}",
       "--tests", str(tests)],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
      env={**os.environ, "PYTHONPATH": str(blocked)})
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((out / "device_check.json").read_text())

  assert (report["tests"]["tests"], report["tests"]["failed"]) == (2, 1), report["tests"]
  assert report["tests"]["failures"] == ["test_toy.test_fails: AssertionError: planted\n"
                                         "assert (1 + 1) == 3"], report["tests"]
  rows = report["throughput"]["rows"]
  assert [(r["layout"], r["dtype"], r["conv"], r["parallel"]) for r in rows] == [
      ("keras", "float32", "shifted", "pmap")]
  for row in rows:
    assert row["train_step_img_s"] > 0 and row["train_loop_img_s"] > 0 and row["infer_img_s"] > 0
    assert row["train_tflops"] == pytest.approx(row["train_step_img_s"] * row["macs"] * 6e-12)
    assert row["torch_eager_train_img_s"] > 0 and row["torch_channels_last_infer_img_s"] > 0
  train = report["train"]
  assert train["epochs"] == 2 and train["finished"] and 0 <= train["test_accuracy"] <= 1
  table = (out / "device_check.md").read_text()
  cells = [[c.strip() for c in line.split("|")[1:6]] for line in table.splitlines()
           if line.startswith("| keras")]
  assert cells == [["keras", "float32", "shifted", "8", "pmap"]]
  assert "smoke recipe on npz:" in table and "2 of 2 epochs" in table


@pytest.mark.parametrize("layout,preset", [("keras", ""), ("torch", "torch")])
def test_the_peer_is_the_reference_network(layout, preset):
  """Same parameter count, and with the JAX model's weights the same logits (TensorFlow's
  padding in the Keras layout included)."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import torch_peer  # pylint: disable=g-import-not-at-top
  from configs import cifar  # pylint: disable=g-import-not-at-top
  from conftest import inference_logits  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import models  # pylint: disable=g-import-not-at-top
  config = cifar.get_config(preset).model
  config.alpha = 0.25
  model = models.create_model(config)
  variables = models.init_variables(model, jax.random.key(0), 32)
  peer = torch_peer.MobileNetV1(layout, alpha=0.25).eval()
  assert sum(p.numel() for p in peer.parameters()) == sum(
      x.size for x in jax.tree.leaves(variables["params"]))

  params, stats = variables["params"], variables["batch_stats"]
  units = [("stem",)] + [(f"block{i + 1}", part) for i in range(13)
                         for part in ("depthwise", "pointwise")]
  t = lambda a: torch.from_numpy(np.asarray(a).copy())
  with torch.no_grad():
    for unit, names in zip(peer.features, units):
      p, s = params, stats
      for name in names:
        p, s = p[name], s[name]
      unit.conv.weight.copy_(t(p["conv"]["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW.
      if unit.conv.bias is not None:
        unit.conv.bias.copy_(t(p["conv"]["bias"]))
      unit.bn.weight.copy_(t(p["bn"]["scale"]))
      unit.bn.bias.copy_(t(p["bn"]["bias"]))
      unit.bn.running_mean.copy_(t(s["bn"]["mean"]))
      unit.bn.running_var.copy_(t(s["bn"]["var"]))
    peer.fc.weight.copy_(t(params["head"]["kernel"]).T)
    peer.fc.bias.copy_(t(params["head"]["bias"]))
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    expected = inference_logits(model, variables, images)
    got = peer(t(images).permute(0, 3, 1, 2)).numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
