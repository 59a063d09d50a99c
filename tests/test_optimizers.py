"""Each optimizer's first updates equal an independent implementation's on the same gradients
(PyTorch's, or timm's where PyTorch has no such optimizer), its weight decay included."""
import jax
import numpy as np
import optax
import pytest

from configs import cifar
from mobilenet_jax import config_lib, errors, optimizers

STEPS = 5
RATE, DECAY = 0.05, 0.01
# Moment decays exact in binary: float32's 1 - 0.999 alone is off by 1e-5 (relative), which
# PyTorch computes in float64; a comparison at 0.999 measures that, not the optimizer.
B1, B2 = 0.875, 0.9921875
SHAPES = {  # A small network's weights, named as the model names them.
    "stem": {"conv": {"kernel": (3, 3, 3, 4)}, "bn": {"scale": (4,), "bias": (4,)}},
    "block1": {"depthwise": {"conv": {"kernel": (3, 3, 1, 4)}},
               "pointwise": {"conv": {"kernel": (1, 1, 4, 6)}}},
    "head": {"kernel": (6, 10), "bias": (10,)},
}
DECAYING = {"stem/conv/kernel", "block1/pointwise/conv/kernel", "head/kernel"}


def _flat(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


def _unflat(flat):
  tree = {}
  for path, value in flat.items():
    *groups, name = path.split("/")
    node = tree
    for group in groups:
      node = node.setdefault(group, {})
    node[name] = value
  return tree


def _start(seed=0):
  rng = np.random.default_rng(seed)
  weights = {p: rng.normal(0, 0.5, s).astype(np.float32) for p, s in _flat(SHAPES)}
  grads = [{p: rng.normal(0, 1, s).astype(np.float32) for p, s in _flat(SHAPES)}
           for _ in range(STEPS)]
  return weights, grads


def _ours(overrides, weights, grads):
  """The weights after each step of optimizers.create_optimizer, the L2 penalty's gradient
  added to the loss's as train_step adds it."""
  config = cifar.get_config("smoke")
  config.update_from_flattened_dict({"schedule.learning_rate": RATE, "schedule.boundaries": (),
                                     "schedule.rates": (), "optim.weight_decay": DECAY,
                                     **overrides})
  tx = optimizers.create_optimizer(config, steps_per_epoch=10)
  params = _unflat(weights)
  state = tx.init(params)
  l2 = jax.grad(optimizers.l2_penalty)
  history = []
  for g in grads:
    g = jax.tree.map(lambda a, b: a + optimizers.loss_weight_decay(config) * b, _unflat(g),
                     l2(params))
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    history.append(dict(_flat(jax.tree.map(np.asarray, params))))
  return history


def _theirs(make, weights, grads):
  """The weights after each step of the torch optimizer `make(groups)`, the decaying weights
  in a group of their own (PyTorch decays per group)."""
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {p: torch.nn.Parameter(torch.tensor(w)) for p, w in weights.items()}
  groups = [{"params": [t for p, t in tensors.items() if p in DECAYING], "weight_decay": DECAY},
            {"params": [t for p, t in tensors.items() if p not in DECAYING], "weight_decay": 0.0}]
  optimizer = make(groups)
  history = []
  for g in grads:
    for p, t in tensors.items():
      t.grad = torch.tensor(g[p])
    optimizer.step()
    history.append({p: t.detach().numpy().copy() for p, t in tensors.items()})
  return history


def _torch(name):
  import torch  # pylint: disable=g-import-not-at-top
  from timm import optim  # pylint: disable=g-import-not-at-top
  return {
      "sgd_nesterov": lambda g: torch.optim.SGD(g, lr=RATE, momentum=0.9, nesterov=True),
      "sgd": lambda g: torch.optim.SGD(g, lr=RATE, momentum=0.9),
      "sgd_plain": lambda g: torch.optim.SGD(g, lr=RATE),
      "rmsprop": lambda g: optim.RMSpropTF(g, lr=RATE, alpha=0.9, eps=1.0, momentum=0.9),
      "adamw": lambda g: torch.optim.AdamW(g, lr=RATE, betas=(B1, B2), eps=1e-8),
      "lamb": lambda g: optim.Lamb(g, lr=RATE, betas=(B1, B2), eps=1e-6,
                                   max_grad_norm=None, always_adapt=True),
  }[name]


@pytest.mark.parametrize("name, overrides", [
    ("sgd_nesterov", {}),
    ("sgd", {"optim.nesterov": False}),
    ("sgd_plain", {"optim.momentum": 0.0}),
    ("rmsprop", {"optim.name": "rmsprop"}),
    ("adamw", {"optim.name": "adamw", "optim.b1": B1, "optim.b2": B2}),
    ("lamb", {"optim.name": "lamb", "optim.b1": B1, "optim.b2": B2}),
])
def test_each_optimizers_first_updates_equal_the_reference_implementation(name, overrides):
  weights, grads = _start()
  ours, theirs = _ours(overrides, weights, grads), _theirs(_torch(name), weights, grads)
  for step, (a, b) in enumerate(zip(ours, theirs)):
    for path in weights:
      np.testing.assert_allclose(a[path], b[path], rtol=2e-6, atol=2e-7,
                                 err_msg=f"{name}, step {step + 1}, {path}")
  assert not np.allclose(ours[-1]["head/kernel"], weights["head/kernel"])  # They moved.


def test_decoupled_decay_moves_only_the_decaying_weights_by_rate_times_decay():
  weights, grads = _start()
  zero = [{p: np.zeros_like(g) for p, g in step.items()} for step in grads[:1]]
  moved = _ours({"optim.decay": "decoupled", "optim.momentum": 0.0}, weights, zero)[0]
  for path, w in weights.items():
    expected = w * (1 - RATE * DECAY) if path in DECAYING else w
    np.testing.assert_allclose(moved[path], expected, rtol=1e-6, err_msg=path)


def test_clipping_scales_the_gradient_to_the_global_norm():
  weights, grads = _start()
  norm = np.sqrt(sum(np.sum(g ** 2) for g in grads[0].values()))
  clip = float(norm / 3)
  moved = _ours({"optim.clip_norm": clip, "optim.momentum": 0.0, "optim.weight_decay": 0.0},
                weights, grads[:1])[0]
  for path, w in weights.items():
    np.testing.assert_allclose(moved[path], w - RATE * grads[0][path] * clip / norm, rtol=1e-5,
                               atol=1e-7, err_msg=path)


@pytest.mark.parametrize("field, value, match", [
    ("optim.name", "adam", "config.optim.name='adam': expected one of"),
    ("optim.weight_decay", -1e-4, "config.optim.weight_decay=-0.0001: must be >= 0"),
    ("optim.decay", "l1", "config.optim.decay='l1': expected one of"),
    ("optim.b2", 1.0, "config.optim.b2=1.0: must be in"),
    ("optim.clip_norm", 0.0, "config.optim.clip_norm=0.0: must be > 0"),
    ("schedule.name", "linear", "config.schedule.name='linear': expected one of"),
    ("schedule.warmup_epochs", 2.0, "config.schedule.warmup_epochs=2.0: must be >= 0 and "
     "shorter than the run"),
    ("schedule.decay_factor", 1.5, "config.schedule.decay_factor=1.5"),
    ("schedule.final_rate", 1.0, "config.schedule.final_rate=1.0: must be in"),
    ("ema.decay", 1.0, "config.ema.decay=1.0: must be in"),
    ("augment.mixup_alpha", -0.2, "config.augment.mixup_alpha=-0.2: must be >= 0"),
    ("augment.mix_switch_prob", -1.0, "config.augment.mix_switch_prob=-1.0: must be a"),
    ("augment.mix_mode", "pair", "config.augment.mix_mode='pair': expected one of"),
    ("optim.micro_batches", 3, "config.optim.micro_batches=3: must be >= 1 and divide each "
     "device's share of config.input.batch_size=16"),
])
def test_a_bad_optimizer_schedule_or_step_field_is_one_line_naming_it(field, value, match, tmp_path):
  config = cifar.get_config("smoke")  # 2 epochs.
  config.update_from_flattened_dict({field: value})
  with pytest.raises(errors.ConfigError, match=match.replace("(", r"\(")) as refusal:
    config_lib.check_config(config, str(tmp_path))
  assert "\n" not in str(refusal.value)


# SGD on the piecewise schedule, the default, trains in most tests: the shared `trained_workdir`
# with a weight average, and under pmap in test_parallel.
@pytest.mark.slow
@pytest.mark.parametrize("optim, schedule, parallel", [
    ({"name": "rmsprop"}, {"name": "exponential", "decay_epochs": 1.0, "staircase": False},
     "pmap"),
    ({"name": "adamw", "weight_decay": 0.05, "clip_norm": 1.0},
     {"name": "cosine", "learning_rate": 1e-3, "warmup_epochs": 1.0}, "jit"),
    ({"name": "lamb", "weight_decay": 0.05, "micro_batches": 2},
     {"name": "cosine", "learning_rate": 1e-3}, "pmap"),
])
def test_the_smoke_run_trains_with_each_optimizer_and_schedule_and_a_weight_average(
    mock_tfds, smoke_config, tmp_path, optim, schedule, parallel):
  from mobilenet_jax import metric_logging, train  # pylint: disable=g-import-not-at-top
  del mock_tfds
  smoke_config.optim.update(optim)
  smoke_config.schedule.update(schedule)
  smoke_config.update(parallel=parallel)
  smoke_config.ema.update(decay=0.9, num_updates=True)
  results = train.train_and_evaluate(smoke_config, str(tmp_path))
  rows = metric_logging.read_metrics(str(tmp_path))
  assert [r["epoch"] for r in rows] == [1, 2]
  rates = optimizers.learning_rate_schedule(smoke_config, 4)
  for row in rows:
    assert np.isfinite(row["train_loss"]) and np.isfinite(row["ema_test_loss"])
    np.testing.assert_allclose(row["learning_rate"], rates(row["step"] - 1), rtol=1e-6)
  assert np.isfinite(results["ema_test_loss"]) and results["test_examples"] == 40
