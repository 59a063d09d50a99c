"""The sampler: epoch permutations, the batch of each step, and its augmentation draws."""
import jax
import jax.numpy as jnp
import numpy as np

from mobilenet_jax import sampler


def _data(n=70):
  return {"image": jnp.arange(n * 2 * 2 * 3, dtype=jnp.int32).reshape(n, 2, 2, 3) % 256,
          "label": jnp.arange(n, dtype=jnp.int32)}


def test_an_epoch_takes_distinct_examples_and_the_next_one_another_order(smoke_config):
  smoke_config.input.batch_size = 16
  s, data = sampler.Sampler(smoke_config, 70), _data()
  assert s.steps_per_epoch == 4  # 70 // 16: the last 6 of each permutation are skipped.
  labels = [np.asarray(s.batch(step, data, s.permutation(step))["label"]) for step in range(8)]
  first, second = np.concatenate(labels[:4]), np.concatenate(labels[4:])
  assert len(set(first)) == 64 and len(set(second)) == 64
  np.testing.assert_array_equal(first, np.asarray(s.permutation(0))[:64])
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(data["image"][first[:16]],
                                s.batch(0, data, s.permutation(0))["image"])


def test_a_device_slice_of_a_batch_is_that_slice_of_the_global_batch(smoke_config):
  smoke_config.update_from_flattened_dict({"input.batch_size": 16, "augment.cutout": 4,
                                           "augment.alternate_flips": True})
  s, data = sampler.Sampler(smoke_config, 70), _data()
  perm = s.permutation(5)
  whole = s.batch(5, data, perm)
  assert set(whole) == {"image", "label", "shift", "flip", "cutout"}
  for offset in (0, 4, 12):
    part = s.batch(5, data, perm, offset, 4)
    for k in whole:
      np.testing.assert_array_equal(part[k], whole[k][offset:offset + 4])


def test_batches_depend_on_the_seed_and_step_only(smoke_config):
  smoke_config.input.batch_size = 16
  a, b = sampler.Sampler(smoke_config, 70), sampler.Sampler(smoke_config, 70)
  smoke_config.seed = 1
  other = sampler.Sampler(smoke_config, 70)
  data = _data()
  first, again, reseeded = (x.batch(6, data, x.permutation(6)) for x in (a, b, other))
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])
  assert not np.array_equal(first["label"], reseeded["label"])
  assert not np.array_equal(first["shift"], reseeded["shift"])


def test_alternate_flips_replace_the_drawn_flips_and_invert_each_epoch(smoke_config):
  smoke_config.update_from_flattened_dict({"input.batch_size": 16, "augment.alternate_flips": True})
  s, data = sampler.Sampler(smoke_config, 64), _data(64)  # Every example in every epoch.
  def flips(epoch):
    out = np.zeros(64, bool)
    for step in range(epoch * 4, epoch * 4 + 4):
      b = s.batch(step, data, s.permutation(step))
      out[np.asarray(b["label"])] = np.asarray(b["flip"])
    return out
  first, second = flips(0), flips(1)
  np.testing.assert_array_equal(second, ~first)
  random = smoke_config.copy_and_resolve_references()
  random.augment.alternate_flips = False
  drawn = sampler.Sampler(random, 64).batch(0, data, s.permutation(0))["flip"]
  assert not np.array_equal(drawn, s.batch(0, data, s.permutation(0))["flip"])


def test_same_key_same_draws_and_different_keys_differ():
  a = sampler.augmentation_draws(jax.random.key(1), 256, 4)
  b = sampler.augmentation_draws(jax.random.key(1), 256, 4)
  c = sampler.augmentation_draws(jax.random.fold_in(jax.random.key(1), 1), 256, 4)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["shift"], c["shift"]) and not np.array_equal(a["flip"], c["flip"])


def test_flip_rate_is_about_one_half_and_shifts_cover_the_range():
  draws = sampler.augmentation_draws(jax.random.key(0), 20_000, 4)
  assert abs(float(draws["flip"].mean()) - 0.5) < 0.015
  assert set(np.unique(draws["shift"]).tolist()) == set(range(9))


def test_cutout_draws_leave_the_translation_and_flip_draws_unchanged():
  rng = jax.random.key(2)
  plain, with_cutout = (sampler.augmentation_draws(rng, 64, 4, cutout=c) for c in (0, 8))
  assert "cutout" not in plain
  for k in plain:
    np.testing.assert_array_equal(plain[k], with_cutout[k])


def test_alternating_flips_invert_each_epoch_from_a_random_phase_per_example():
  rng, idx = jax.random.key(0), jnp.arange(20_000)
  first, second, third = (np.asarray(sampler.alternating_flips(rng, idx, e))
                          for e in (0, 1, 2))
  np.testing.assert_array_equal(second, ~first)
  np.testing.assert_array_equal(third, first)
  assert abs(first.mean() - 0.5) < 0.015
  # A property of the example, not of its place in the batch.
  order = jax.random.permutation(jax.random.key(1), 20_000)
  np.testing.assert_array_equal(sampler.alternating_flips(rng, order, 5), second[order])


def test_epoch_permutations_are_permutations_that_change_per_epoch():
  rng = jax.random.key(0)
  p0, p1 = (np.asarray(sampler.epoch_permutation(rng, e, 1000)) for e in (0, 1))
  assert sorted(p0) == list(range(1000)) and not np.array_equal(p0, p1)
  np.testing.assert_array_equal(p0, sampler.epoch_permutation(rng, 0, 1000))
