"""Every preset: valid, buildable, and its schedule the rates it states."""
import numpy as np
import pytest

from configs import cifar, imagenet
from mobilenet_jax import models, steps, summary, train

PRESETS = [(cifar, p) for p in ("", "torch", "quick", "smoke")] + [
    (imagenet, p) for p in ("keras", "timm", "keras,cifar10", "timm,cifar10")]


@pytest.mark.parametrize("module, preset", PRESETS, ids=[f"{m.__name__}:{p}" for m, p in PRESETS])
def test_every_preset_passes_the_checks_and_builds(module, preset, tmp_path):
  config = module.get_config(preset)
  train.check_config(config, str(tmp_path))
  table = summary.summarize(models.create_model(config.model), config.image_size)
  assert table.params > 0 and table.macs > 0


@pytest.mark.parametrize("module, preset", PRESETS, ids=[f"{m.__name__}:{p}" for m, p in PRESETS])
def test_every_presets_schedule_steps_through_its_rates_at_its_epochs(module, preset):
  config, steps_per_epoch = module.get_config(preset), 390
  schedule = steps.learning_rate_schedule(config, steps_per_epoch)
  rates = (config.learning_rate, *config.lr_values)
  starts = (0, *(int(b * steps_per_epoch) for b in config.lr_boundaries))
  ends = (*starts[1:], config.num_epochs * steps_per_epoch)
  for rate, start, end in zip(rates, starts, ends):
    if start >= end:  # A boundary at or after the last epoch (smoke's at 2 of 2).
      continue
    np.testing.assert_allclose([float(schedule(start)), float(schedule(end - 1))], rate,
                               rtol=1e-6)
