"""The throughput benchmark: the peer once per round, ratios paired by round; its upper bounds."""
import argparse
import functools
import statistics

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import throughput
from configs import cifar
from mobilenet_jax import convolutions, models


def test_rounds_take_turns():
  calls = []
  def timer(name):
    def run():
      calls.append(name)
      return {name: float(len(calls))}
    return run
  rates = throughput._rounds([timer("a"), timer("b")], 3)
  assert calls == ["a", "b"] * 3
  assert rates == {"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0]}


def test_ratios_pair_rounds_not_medians():
  # Per-round ratios 2, 1 and 3: their median is 2, the ratio of the medians 4 / 3.
  assert throughput._median_ratio([2.0, 4.0, 9.0], [1.0, 4.0, 3.0]) == 2.0


@pytest.mark.slow
def test_a_row_divides_each_round_by_that_round_of_the_peer(monkeypatch):
  peer_rounds = iter([100.0, 300.0, 200.0])
  def peer():
    rate = next(peer_rounds)
    return {"peer_train_img_s": rate, "peer_infer_eager_img_s": 10 * rate,
            "peer_infer_compiled_img_s": 20 * rate}
  peer.torch, peer.threads = "fake", 2
  recorded = {}
  def spy(timers, repeats):
    recorded.update(rounds(timers, repeats))
    return recorded
  rounds = throughput._rounds
  monkeypatch.setattr(throughput, "_rounds", spy)
  args = argparse.Namespace(batch=8, alpha=0.25, dtype="float32", parallel="jit",
                            inference_chunk=None, steps=1, repeats=3, free_depthwise=False,
                            free_depthwise_and_norm=False)

  row = throughput.measure(args, "keras", "auto", peer)

  assert len(recorded["train_step_img_s"]) == len(recorded["peer_train_img_s"]) == 3
  assert row["peer_train_img_s"] == 200.0 and row["torch"] == "fake"
  assert row["train_ratio"] == statistics.median(
      s / p for s, p in zip(recorded["train_step_img_s"], [100.0, 300.0, 200.0]))
  assert row["infer_ratio"] == statistics.median(
      i / (20 * p) for i, p in zip(recorded["infer_img_s"], [100.0, 300.0, 200.0]))
  assert row["loop_vs_step"] == statistics.median(
      l / s for l, s in zip(recorded["train_loop_img_s"], recorded["train_step_img_s"]))
  assert all(row[k] > 0 for k in ("train_step_img_s", "train_loop_img_s", "infer_img_s"))


def test_free_depthwise_and_norm_leaves_only_the_matmuls_and_relus(monkeypatch):
  for module, name in ((convolutions, "depthwise"), (models, "conv_and_norm")):
    monkeypatch.setattr(module, name, getattr(module, name))  # Undone after the test.
  config = cifar.get_config("smoke").model
  config.update(stem_stride=1, conv="shifted", use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = jax.eval_shape(lambda: models.create_model(config).init(jax.random.key(1), x,
                                                                      train=False))

  throughput._free_depthwise_and_norm()
  model = models.create_model(config)
  bound = models.init_variables(model, jax.random.key(1), 8)
  # The model's own conv and dense parameters, BatchNorm's gone.
  flat = flax.traverse_util.flatten_dict
  assert set(flat(bound["params"])) == {k for k in flat(variables["params"]) if "bn" not in k}

  def by_hand(params):  # im2col stem, then per block a strided slice and a 1x1 conv, ReLUs.
    patches = jnp.concatenate([jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))[:, i:i + 8, j:j + 8]
                               for i in range(3) for j in range(3)], -1)
    h = jax.nn.relu(patches @ params["stem"]["conv"]["kernel"].reshape(27, -1))
    for i, (_, stride) in enumerate(models.BLOCKS):
      h = jax.nn.relu(h[:, ::stride, ::stride] @ params[f"block{i + 1}"]["pointwise"]["conv"][
          "kernel"][0, 0])
    return h.mean((1, 2)) @ params["head"]["kernel"] + params["head"]["bias"]

  for train in (False, True):
    out = jax.jit(functools.partial(model.apply, train=train,
                                    mutable=["batch_stats"] if train else False))(bound, x)
    np.testing.assert_allclose(out[0] if train else out, by_hand(bound["params"]),
                               rtol=1e-4, atol=1e-5)


def test_the_two_bounds_exclude_each_other(monkeypatch, capsys):
  monkeypatch.setattr("sys.argv",
                      ["throughput.py", "--free-depthwise", "--free-depthwise-and-norm"])
  with pytest.raises(SystemExit):
    throughput.main()
  assert "--free-depthwise-and-norm: not allowed with argument --free-depthwise" in (
      capsys.readouterr().err)
