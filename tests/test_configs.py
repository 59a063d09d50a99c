"""Every preset: valid, buildable, and its schedule the rates it states."""
import numpy as np
import pytest

from configs import cifar, imagenet
from mobilenet_jax import models, steps, summary, train

PRESETS = [(cifar, p) for p in ("", "torch", "quick", "smoke")] + [
    (imagenet, p) for p in ("keras", "timm", "keras,cifar10", "timm,cifar10", "train")]


@pytest.mark.parametrize("module, preset", PRESETS, ids=[f"{m.__name__}:{p}" for m, p in PRESETS])
def test_every_preset_passes_the_checks_and_builds(module, preset, tmp_path):
  config = module.get_config(preset)
  train.check_config(config, str(tmp_path))
  table = summary.summarize(models.create_model(config.model), config.image_size)
  assert table.params > 0 and table.macs > 0


@pytest.mark.parametrize("module, preset", PRESETS, ids=[f"{m.__name__}:{p}" for m, p in PRESETS])
def test_every_presets_schedule_steps_through_its_rates_at_its_epochs(module, preset):
  config, steps_per_epoch = module.get_config(preset), 390
  config = train.with_global_batch(config)
  schedule = steps.learning_rate_schedule(config, steps_per_epoch)
  scale = config.batch_size / config.lr_batch if config.lr_batch else 1.0
  rates = [r * scale for r in (config.learning_rate, *config.lr_values)]
  starts = (0, *(int(b * steps_per_epoch) for b in config.lr_boundaries))
  ends = (*starts[1:], config.num_epochs * steps_per_epoch)
  for rate, start, end in zip(rates, starts, ends):
    if start >= end:  # A boundary at or after the last epoch (smoke's at 2 of 2).
      continue
    np.testing.assert_allclose([float(schedule(start)), float(schedule(end - 1))], rate,
                               rtol=1e-6)


def test_imagenet_recipe_is_slims_scaled_to_the_global_batch(monkeypatch):
  monkeypatch.setattr(train.jax, "process_count", lambda: 4)
  config = train.with_global_batch(imagenet.get_config("train"))
  assert config.batch_size == 256  # 64 per process.
  schedule = steps.learning_rate_schedule(config, steps_per_epoch=100)
  # Slim: 0.045 for 64 images, staircase x0.94 every 2.5 epochs; here 4x the batch, 4x the rate.
  for epoch in (0, 2.4, 2.5, 7.6, 99.9):
    np.testing.assert_allclose(float(schedule(int(epoch * 100))),
                               4 * 0.045 * 0.94 ** (epoch // 2.5), rtol=1e-6)
