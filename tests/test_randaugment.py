"""RandAugment against timm's, which applies each op with PIL: every op, the policy strings,
and whole images through the drawn ops, with timm's random choices replaced by our draws."""
import random
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
from timm.data import auto_augment

from mobilenet_jax import errors, randaugment, sampler

FILL = (125, 123, 114)  # CIFAR-10's mean colour, as timm's `img_mean` rounds it.
HPARAMS = {"translate_const": 100, "img_mean": FILL, "interpolation": Image.BILINEAR}
# The ops that negate their argument with probability 1/2 (timm's _randomly_negate).
SIGNED = {*randaugment.GEOMETRIC, "ColorIncreasing", "ContrastIncreasing",
          "BrightnessIncreasing", "SharpnessIncreasing"}


def _image(h, w, seed):
  """A photo-like uint8 image: gradients, 4x4 blobs of colour and noise, every value range."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:h, :w]
  ramps = np.stack([x * 255 / w, y * 255 / h, (x + y) * 128 / (h + w)], -1)
  blobs = np.kron(rng.uniform(0, 255, (h // 4 + 1, w // 4 + 1, 3)), np.ones((4, 4, 1)))[:h, :w]
  return np.clip(0.5 * ramps + 0.5 * blobs + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


IMAGES = (_image(32, 32, 0), _image(40, 56, 1))


def _timm_op(name, magnitude, negate, image):
  op = auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=HPARAMS)
  with mock.patch.object(random, "random", return_value=1.0 if negate else 0.0):
    return np.asarray(op(Image.fromarray(image)))


@pytest.mark.parametrize("name", sorted(set(randaugment.OPS) | set(randaugment.INCREASING_OPS)))
def test_each_op_at_three_magnitudes_is_timms_within_a_grey_level(name):
  ours = jax.jit(randaugment.FUNCTIONS[name])
  for magnitude in (3, 6, 9):
    for negate in ((False, True) if name in SIGNED else (False,)):
      for image in IMAGES:
        expected = _timm_op(name, magnitude, negate, image)
        got = np.asarray(ours(image, jnp.float32(magnitude), negate, jnp.asarray(FILL, float)))
        off = np.abs(got.astype(int) - expected.astype(int))
        assert (off <= 1).mean() >= 0.99 and off.max() <= 2, (name, magnitude, negate, off.max())


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m7-n3", "rand-m9-mstd101",
                                  "rand-n1-p0.8-mmax12", "rand"])
def test_a_policy_string_reads_as_timms(spec):
  policy = randaugment.parse(spec)
  timm = auto_augment.rand_augment_transform(spec, dict(HPARAMS))
  assert policy.layers == timm.num_layers
  assert policy.ops == tuple(op.name for op in timm.ops)
  for op in timm.ops:
    assert (policy.prob, policy.magnitude) == (op.prob, op.magnitude)
    assert policy.magnitude_std == op.magnitude_std
    assert policy.magnitude_max == (op.magnitude_max or randaugment.LEVEL_DENOM)


@pytest.mark.parametrize("spec, part", [("augmix-m5", "expected timm's RandAugment string"),
                                        ("rand-m9-x3", "'x3' is none of these"),
                                        ("rand-mstdhigh", "'mstdhigh' is none of these"),
                                        ("rand-p1.5", "p in [0, 1]")])
def test_a_bad_policy_string_is_one_line_naming_the_field(spec, part):
  with pytest.raises(errors.ConfigError, match=r"^config\.augment\.randaugment=") as refusal:
    randaugment.parse(spec)
  assert part in str(refusal.value) and "\n" not in str(refusal.value)


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "rand-m6-n3-p0.7"])
def test_images_through_their_drawn_ops_are_timms_with_the_same_choices(spec):
  policy = randaugment.parse(spec)
  images = np.stack([_image(32, 32, seed) for seed in range(12)])
  draws = jax.device_get(sampler.randaugment_draws(jax.random.key(5), len(images), policy))
  got = np.asarray(jax.jit(lambda x, d: randaugment.apply(x, d, policy, jnp.asarray(
      FILL, float)))(images, draws))
  timm = auto_augment.rand_augment_transform(spec, dict(HPARAMS))
  for i, image in enumerate(images):
    ops = [timm.ops[k] for k in draws["randaugment_op"][i]]
    uniforms, gauss = [], []  # What timm's random.random and random.gauss return, in turn.
    for layer, op in enumerate(ops):
      applied = draws["randaugment_applied"][i, layer]
      uniforms.append(0.0 if applied else 1.0)
      if applied and policy.magnitude_std:
        gauss.append(float(draws["randaugment_magnitude"][i, layer]))
      if applied and op.name in SIGNED:
        uniforms.append(1.0 if draws["randaugment_negate"][i, layer] else 0.0)
    with mock.patch.object(np.random, "choice", return_value=ops), \
        mock.patch.object(random, "random", side_effect=uniforms), \
        mock.patch.object(random, "gauss", side_effect=gauss):
      expected = np.asarray(timm(Image.fromarray(image)))
    off = np.abs(got[i].astype(int) - expected.astype(int))
    assert (off <= 2).mean() >= 0.99, (i, [op.name for op in ops])


def test_the_draws_are_timms_distributions_and_a_devices_share_is_its_slice():
  config = ml_collections.ConfigDict({
      "seed": 0, "input": {"batch_size": 4000, "image_size": 32},
      "augment": {"crop_padding": 4, "cutout": 0, "alternate_flips": False,
                  "randaugment": "rand-m8-mstd1-p0.3", "erase_prob": 0.0, "mixup_alpha": 0.0,
                  "cutmix_alpha": 0.0}})
  draws = sampler.Sampler(config, 8000).draws(3, jnp.arange(4000))
  op, applied, magnitude = (np.asarray(draws[f"randaugment_{k}"])
                            for k in ("op", "applied", "magnitude"))
  assert np.bincount(op.reshape(-1), minlength=15).min() > 0.85 * 8000 / 15
  assert abs(applied.mean() - 0.3) < 0.02
  assert abs(magnitude.mean() - 8) < 0.05 and abs(magnitude.std() - 1) < 0.05
  assert abs(np.asarray(draws["randaugment_negate"]).mean() - 0.5) < 0.02
  # The same (seed, step) draws the same; a device's rows are those of the global batch.
  share = sampler.Sampler(config, 8000).draws(3, jnp.arange(4000)[8:16], offset=8, size=8)
  for key in ("op", "applied", "magnitude", "negate"):
    np.testing.assert_array_equal(share[f"randaugment_{key}"], draws[f"randaugment_{key}"][8:16])
  other = sampler.Sampler(config, 8000).draws(4, jnp.arange(4000))
  assert (np.asarray(other["randaugment_op"]) != op).mean() > 0.9
