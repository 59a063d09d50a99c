"""Every preset: valid, buildable, and its schedule the rates it states; old config.json files."""
import json
import pathlib
import re

import numpy as np
import pytest

from configs import cifar, imagenet
from mobilenet_jax import config_lib, models, optimizers, summary, workdirs

DATA = pathlib.Path(__file__).parent / "data"

PRESETS = [(cifar, p) for p in ("", *cifar.PRESETS)] + [(imagenet, p) for p in (
    *imagenet.PRESETS, "keras,cifar10", "timm,cifar10")]


@pytest.mark.parametrize("module, preset", PRESETS, ids=[f"{m.__name__}:{p}" for m, p in PRESETS])
def test_every_preset_passes_the_checks_and_builds(module, preset, tmp_path):
  config = module.get_config(preset)
  config_lib.check_config(config, str(tmp_path))
  table = summary.summarize(models.create_model(config.model), config.input.image_size)
  assert table.params > 0 and table.macs > 0


def _numpy_rate(config, steps_per_epoch: int, step: int) -> float:
  """The schedule's closed form, in numpy, from the config's fields."""
  s, total = config.schedule, config.num_epochs * steps_per_epoch
  scale = config.input.batch_size / s.reference_batch if s.reference_batch else 1.0
  if s.name == "piecewise":
    passed = sum(step >= int(b * steps_per_epoch) for b in s.boundaries)
    rate = (s.learning_rate, *s.rates)[passed]
  elif s.name == "cosine":
    rate = s.final_rate + (s.learning_rate - s.final_rate) * (1 + np.cos(np.pi * step / total)) / 2
  else:
    exponent = step / (s.decay_epochs * steps_per_epoch)
    rate = s.learning_rate * s.decay_factor ** (np.floor(exponent) if s.staircase else exponent)
  warmup = s.warmup_epochs * steps_per_epoch
  return rate * scale * (min(1.0, (step + 1) / warmup) if warmup else 1.0)


def _check_points(config, steps_per_epoch: int):
  """The start, each epoch's first and last step, the warm-up's end and the last step."""
  total = config.num_epochs * steps_per_epoch
  warmup = int(config.schedule.warmup_epochs * steps_per_epoch)
  epochs = {e * steps_per_epoch + d for e in range(config.num_epochs + 1) for d in (-1, 0)}
  return sorted(p for p in epochs | {warmup - 1, warmup, total - 1} if 0 <= p < total)


@pytest.mark.parametrize("module, preset", PRESETS, ids=[f"{m.__name__}:{p}" for m, p in PRESETS])
def test_every_presets_schedule_is_its_closed_form_at_every_epoch(module, preset):
  config, steps_per_epoch = config_lib.with_global_batch(module.get_config(preset)), 39
  schedule = optimizers.learning_rate_schedule(config, steps_per_epoch)
  for step in _check_points(config, steps_per_epoch):
    # float32's cosine near the run's end: a few 1e-9 off a rate of 1e-4 (rtol alone: 4e-6).
    np.testing.assert_allclose(float(schedule(step)), _numpy_rate(config, steps_per_epoch, step),
                               rtol=2e-6, atol=1e-8, err_msg=f"step {step}")


@pytest.mark.parametrize("overrides", [
    {"schedule.name": "piecewise", "schedule.boundaries": (3, 7.5), "schedule.rates": (0.1, 0.03)},
    {"schedule.name": "cosine", "schedule.final_rate": 0.01},
    {"schedule.name": "exponential", "schedule.decay_epochs": 1.5, "schedule.staircase": True},
    {"schedule.name": "exponential", "schedule.decay_epochs": 2, "schedule.staircase": False}],
    ids=["piecewise", "cosine", "exponential_staircase", "exponential_smooth"])
@pytest.mark.parametrize("warmup", [0, 2.5])
def test_each_schedule_is_its_closed_form_at_its_boundaries_warm_up_included(overrides, warmup):
  config = cifar.get_config("smoke")
  config.update_from_flattened_dict({"num_epochs": 10, "schedule.learning_rate": 0.4,
                                     "schedule.warmup_epochs": warmup, **overrides})
  steps_per_epoch = 20
  schedule = optimizers.learning_rate_schedule(config, steps_per_epoch)
  points = _check_points(config, steps_per_epoch) + [30, 149, 150]  # Mid-decay, 7.5 epochs.
  for step in points:
    np.testing.assert_allclose(float(schedule(step)), _numpy_rate(config, steps_per_epoch, step),
                               rtol=2e-6, err_msg=f"step {step}")


@pytest.mark.parametrize("preset, per_rate, every, epochs", [
    ("train", 64, 2.5, (0, 2.4, 2.5, 7.6, 99.9)), ("paper", 32, 2.0, (0, 1.9, 2.0, 7.6, 99.9))])
def test_the_imagenet_recipes_are_slims_scaled_to_the_global_batch(monkeypatch, preset, per_rate,
                                                                    every, epochs):
  # Slim: 0.045 for `per_rate` images, staircase x0.94 every `every` epochs; here 4 processes
  # of 64 images, the rate scaled as the batch.
  monkeypatch.setattr(config_lib.jax, "process_count", lambda: 4)
  config = config_lib.with_global_batch(imagenet.get_config(preset))
  assert config.input.batch_size == 256
  schedule = optimizers.learning_rate_schedule(config, steps_per_epoch=100)
  for epoch in epochs:
    np.testing.assert_allclose(float(schedule(int(epoch * 100))),
                               256 / per_rate * 0.045 * 0.94 ** (epoch // every), rtol=1e-6)


def test_timms_ra_recipe_warms_up_then_decays_its_rate_per_1024_images(monkeypatch):
  monkeypatch.setattr(config_lib.jax, "process_count", lambda: 4)
  config = config_lib.with_global_batch(imagenet.get_config("timm_ra"))
  schedule = optimizers.learning_rate_schedule(config, steps_per_epoch=100)
  peak = 0.064 * 256 / 1024
  for epoch in (0, 1.5, 2.99, 3.0, 4.79, 4.8, 100.0, 599.99):
    step = round(epoch * 100)
    np.testing.assert_allclose(float(schedule(step)), peak * 0.973 ** (epoch // 2.4) *
                               min(1.0, (step + 1) / 300), rtol=1e-5, err_msg=str(epoch))
  assert (config.augment.randaugment, config.augment.erase_prob, config.ema.decay) == (
      "rand-m9-mstd0.5", 0.2, 0.9999)


def test_the_papers_recipe_is_tensorflows_rmsprop_with_a_weight_average():
  config = imagenet.get_config("paper")
  optim = config.optim
  assert (optim.name, optim.momentum, optim.rms_decay, optim.rms_initial, optim.epsilon) == (
      "rmsprop", 0.9, 0.9, 1.0, 1.0)
  assert optimizers.decay_style(optim) == "l2" and optim.weight_decay == 4e-5
  assert (config.ema.decay, config.ema.num_updates) == (0.9999, True)


# :train's exponential decay as the flat config wrote it: 39 boundaries and rates.
SLIM_STEPS = {"schedule.name": "piecewise",
              "schedule.boundaries": tuple(2.5 * k for k in range(1, 40)),
              "schedule.rates": tuple(0.045 * 0.94 ** k for k in range(1, 40))}


@pytest.mark.parametrize("saved, module, preset, then", [
    ("config_flat_quick.json", cifar, "quick", {}),
    ("config_flat_imagenet_train.json", imagenet, "train", SLIM_STEPS)])
def test_a_flat_config_json_upgrades_to_the_preset_that_wrote_it(saved, module, preset, then):
  # Written by the flat config of 2026-12-04 (before the groups), as config.json holds it.
  flat = json.loads((DATA / saved).read_text())
  expected = module.get_config(preset)
  expected.update_from_flattened_dict(then)
  assert json.loads(json.dumps(workdirs.upgrade(flat))) == json.loads(expected.to_json())


def test_command_line_values_parse_as_their_fields_and_none_undoes_a_preset():
  config = imagenet.get_config("train")  # Sets input.per_process_batch_size and a folder.
  config_lib.override(config, {
      "input.per_process_batch_size": "None", "data.train_examples": "none", "seed": "3",
      "schedule.boundaries": "(1, 2.5)", "schedule.rates": "0.1", "data.download": "False",
      "optim.weight_decay": "1e-3", "data.name": "folder:/x,y", "eval.crop": "null"})
  assert config.input.per_process_batch_size is None and config.data.train_examples is None
  assert config.seed == 3 and config.schedule.boundaries == (1, 2.5)
  assert config.schedule.rates == (0.1,) and config.data.download is False
  assert config.optim.weight_decay == 1e-3 and config.data.name == "folder:/x,y"
  assert config.eval.crop is None
  config_lib.override(config, {"input.per_process_batch_size": "32", "eval.crop": "0.875"})
  assert config.input.per_process_batch_size == 32 and config.eval.crop == 0.875


@pytest.mark.parametrize("override, message", [
    ({"num_epochs": "None"}, "--config.num_epochs=None: this field needs a value"),
    ({"seed": "1.5"}, "--config.seed=1.5: expected int."),
    ({"data.download": "yes"}, "expected bool."),
    ({"model": "x"}, "--config.model: no such field"),
    ({"model.alfa": "1"}, "did you mean --config.model.alpha?"),
    ({"dataset": "cifar100"}, "did you mean --config.data.name?"),
    ({"eval_flip": "True"}, "did you mean --config.eval.flip?")])
def test_a_bad_override_names_the_flag_and_the_fix(override, message):
  with pytest.raises(config_lib.errors.ConfigError, match=message.replace("?", "\\?")):
    config_lib.override(cifar.get_config(), override)


def test_the_readme_and_the_docstrings_name_the_presets_that_exist():
  root = DATA.parents[1]
  readme = (root / "README.md").read_text()
  table = readme[readme.index("## Presets and flags"):readme.index("## Results")]
  named = {cell for row in re.findall(r"^\| (.+?) \|", table, re.M) for cell in
           re.findall(r"`([^`]+)`", row)}
  assert "*(none)*" in table
  assert named == {*cifar.PRESETS, "configs/imagenet.py:keras", ":timm",
                   "configs/imagenet.py:train", "configs/imagenet.py:paper",
                   "configs/imagenet.py:timm_ra"}
  assert set(imagenet.PRESETS) == {"keras", "timm", "train", "paper", "timm_ra"}
  for module in (cifar, imagenet):  # Each preset's docstring holds its own command.
    for name, preset in module.PRESETS.items():
      assert f"{module.__name__.split('.')[-1]}.py:{name}" in preset.__doc__, name
  texts = [readme, cifar.__doc__, imagenet.__doc__, (root / "docs" / "guide.md").read_text(),
           *(p.__doc__ for m in (cifar, imagenet) for p in m.PRESETS.values())]
  for module, preset in {m for text in texts for m in re.findall(
      r"configs/(cifar|imagenet)\.py:([a-z0-9_,]+)", text)}:
    {"cifar": cifar, "imagenet": imagenet}[module].get_config(preset)  # Raises if unknown.
