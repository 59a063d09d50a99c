"""Mixup, CutMix and random erasing: the draws as timm's, their application as numpy's."""
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from timm.data import mixup as timm_mixup

from mobilenet_jax import input_pipeline, mixing, sampler

SIZE = 16


def _augment(**fields):
  augment = ml_collections.ConfigDict({"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 1.0,
                                       "mix_switch_prob": 0.5, "mix_mode": "elem"})
  augment.update(fields)
  return augment


def test_the_cutmix_box_and_its_lambda_correction_are_timms():
  rng = np.random.default_rng(0)
  lam = rng.uniform(0, 1, 300).astype(np.float32)
  lam[:3] = (0.0, 1.0, 0.5)
  centre = rng.integers(0, SIZE, (300, 2))
  centre[:3] = ((0, 0), (SIZE - 1, 3), (SIZE - 1, SIZE - 1))  # Clipped at the borders.
  box, corrected = sampler.cutmix_box(jnp.asarray(lam), jnp.asarray(centre), SIZE)
  for i in range(len(lam)):
    # timm's rand_bbox draws the centre's y, then its x, with np.random.randint.
    with mock.patch.object(np.random, "randint", side_effect=list(centre[i])):
      expected, expected_lam = timm_mixup.cutmix_bbox_and_lam((3, SIZE, SIZE), float(lam[i]))
    assert tuple(np.asarray(box[i])) == tuple(expected), i
    np.testing.assert_allclose(corrected[i], expected_lam, rtol=1e-6)


@pytest.mark.parametrize("mode", ["elem", "batch"])
def test_mixed_images_and_targets_are_timms_from_the_same_draws(mode):
  n, classes, smoothing = 16, 10, 0.1
  draws = jax.device_get(sampler.mixing_draws(jax.random.key(3), n, SIZE, _augment(mix_mode=mode)))
  if mode == "batch":  # One draw for the whole batch.
    assert all((d == d[0]).all() for d in draws.values())
  else:
    assert 0 < draws["mix_cut"].sum() < n  # Both kinds, for the test to cover.
  rng = np.random.default_rng(1)
  images = rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
  labels = rng.integers(0, classes, n).astype(np.int32)
  mixed, targets, counted = mixing.mix(jnp.asarray(images), jnp.asarray(labels), draws, classes,
                                       smoothing)
  expected = images.copy()
  for i in range(n):  # timm's Mixup._mix_elem, with our draws.
    j, lam = n - 1 - i, draws["mix_lam"][i]
    if draws["mix_cut"][i]:
      top, bottom, left, right = draws["mix_box"][i]
      expected[i, top:bottom, left:right] = images[j, top:bottom, left:right]
      assert lam == pytest.approx(1 - (bottom - top) * (right - left) / SIZE**2)
    else:
      assert not draws["mix_box"][i].any()
      expected[i] = images[i] * lam + images[j] * (1 - lam)
  np.testing.assert_array_equal(mixed, expected)
  timm_targets = timm_mixup.mixup_target(torch.from_numpy(labels), classes,
                                         torch.tensor(draws["mix_lam"])[:, None], smoothing)
  np.testing.assert_allclose(targets, timm_targets.numpy(), rtol=1e-6, atol=1e-7)
  heavier = np.where(draws["mix_lam"] >= 0.5, labels, labels[::-1])
  np.testing.assert_array_equal(counted, heavier)


def test_mixing_draws_follow_the_switch_and_apply_probabilities():
  n = 4000
  both = jax.device_get(sampler.mixing_draws(jax.random.key(0), n, SIZE,
                                             _augment(mix_switch_prob=0.25, mix_prob=0.6)))
  assert abs(both["mix_cut"].mean() - 0.25) < 0.03
  mixup_rows = ~both["mix_cut"]
  assert abs((both["mix_lam"][mixup_rows] == 1).mean() - 0.4) < 0.03  # Not applied: lam 1.
  # Beta(0.8, 0.8) is symmetric: its mean is 1/2.
  applied = both["mix_lam"][mixup_rows & (both["mix_lam"] < 1)]
  assert abs(applied.mean() - 0.5) < 0.03
  cutmix_only = jax.device_get(sampler.mixing_draws(jax.random.key(0), n, SIZE,
                                                    _augment(mixup_alpha=0.0)))
  assert cutmix_only["mix_cut"].all()


@pytest.mark.parametrize("mode", ["const", "rand", "pixel"])
def test_random_erasing_replaces_each_drawn_rectangle_and_nothing_else(mode):
  n = 64
  draws = jax.device_get(sampler.erasing_draws(jax.random.key(2), n, SIZE, 0.5, mode))
  images = np.random.default_rng(0).normal(size=(n, SIZE, SIZE, 3)).astype(np.float32) + 5
  erased = np.asarray(input_pipeline.erase(jnp.asarray(images), draws))
  expected = images.copy()
  for i, (top, left, height, width) in enumerate(draws["erase_box"]):
    fill = 0.0 if mode == "const" else draws["erase_noise"][i]
    if mode == "pixel":
      fill = fill[top:top + height, left:left + width]
    expected[i, top:top + height, left:left + width] = fill
  np.testing.assert_array_equal(erased, expected)
  if mode == "rand":  # One colour per rectangle.
    assert draws["erase_noise"].shape == (n, 1, 1, 3)


def test_random_erasing_draws_rectangles_of_timms_area_and_aspect_inside_the_image():
  n, size = 4000, 32
  box = np.asarray(sampler.erasing_draws(jax.random.key(0), n, size, 0.5, "const")["erase_box"])
  top, left, height, width = box.T
  erased = height > 0
  assert abs(erased.mean() - 0.5) < 0.03
  assert (top + height <= size).all() and (left + width <= size).all()
  assert (height < size).all() and (width < size).all()
  h, w = height[erased], width[erased]
  # Drawn before rounding to whole pixels: area 2-33% of the image, aspect ratio 0.3-3.3.
  assert (((h - 0.5) * (w - 0.5) <= size**2 / 3) &
          ((h + 0.5) * (w + 0.5) >= 0.02 * size**2)).all()
  assert ((h + 0.5) / np.maximum(w - 0.5, 0.5) >= 0.3).all()
  assert ((h - 0.5) / (w + 0.5) <= 1 / 0.3).all()
  # Positions uniform over where the rectangle fits: its left edge is as often in either half.
  assert abs((left[erased] < (size - w) / 2).mean() - 0.5) < 0.05
