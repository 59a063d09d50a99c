"""Input pipeline: loading (mock and real CIFAR-10), augmentation, eval coverage, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED_TFDS
from mobilenet_jax import images, input_pipeline, sampler


@pytest.mark.slow
def test_mock_load_shapes_dtypes_and_labels(mock_tfds, smoke_config):
  del mock_tfds
  smoke_config.data.train_examples = None
  smoke_config.data.eval_examples = None
  data = input_pipeline.load(smoke_config)
  for split in (data.train, data.test):
    assert split.images.shape == (64, 32, 32, 3) and split.images.dtype == np.uint8
    assert split.labels.shape == (64,) and split.labels.dtype == np.int32
    assert split.labels.min() >= 0 and split.labels.max() < 10
  assert data.num_classes == 10 and len(data.label_names) == 10


@pytest.mark.parametrize("dataset,limits", [("cifar10", (64, 40)), ("cifar100", (None, None))])
def test_the_subprocesses_mock_data_is_mock_tfds_data(mock_tfds, smoke_config, dataset, limits):
  """mock_run.py (the tests' run.py in a subprocess) gives what `mock_tfds` reads through tfds."""
  import mock_run  # pylint: disable=g-import-not-at-top
  del mock_tfds
  smoke_config.update_from_flattened_dict({"data.name": dataset, "data.train_examples": limits[0],
                                           "data.eval_examples": limits[1]})
  expected, mocked = input_pipeline.load(smoke_config), mock_run.mock_load(smoke_config)
  for split in ("train", "test"):
    for field in ("images", "labels"):
      a, b = getattr(getattr(expected, split), field), getattr(getattr(mocked, split), field)
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b, err_msg=f"{split} {field}")
  assert (expected.num_classes, expected.label_names) == (mocked.num_classes, mocked.label_names)


def test_cifar100_loads(mock_tfds, smoke_config):
  del mock_tfds
  smoke_config.data.name = "cifar100"
  data = input_pipeline.load(smoke_config)
  assert data.num_classes == 100 and data.train.images.shape[1:] == (32, 32, 3)


def test_grayscale_datasets_are_read_as_rgb(mock_tfds, smoke_config):
  del mock_tfds
  smoke_config.data.name = "mnist"
  images = input_pipeline.load(smoke_config).train.images
  assert images.shape == (64, 28, 28, 3) and images.dtype == np.uint8 and images.std() > 0
  np.testing.assert_array_equal(images[..., 0], images[..., 1])
  np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_variable_size_images_are_read_at_image_size(mock_tfds, smoke_config):
  del mock_tfds
  smoke_config.update_from_flattened_dict({"data.name": "tf_flowers", "input.image_size": 24,
                                           "data.train_split": "train[:90%]",
                                           "data.eval_split": "train[90%:]"})
  data = input_pipeline.load(smoke_config)
  assert data.train.images.shape == (64, 24, 24, 3) and data.test.images.shape == (40, 24, 24, 3)
  assert data.train.images.dtype == np.uint8 and data.num_classes == 5


def test_variable_size_images_keep_their_centre_square():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 10:30] = 200  # The centre square; squashing would bring in the zero columns.
  out = np.asarray(images.square_and_resize_tf(tf.constant(image), 16))
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, 200)


@pytest.mark.parametrize("h,w,size", [(20, 40, 12), (41, 23, 12), (16, 16, 12), (9, 14, 12)])
def test_reading_a_variable_size_image_equals_predicts_crop_and_on_device_resize(h, w, size):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = np.random.default_rng(h).integers(0, 256, (h, w, 3), np.uint8)
  read = np.asarray(images.square_and_resize_tf(tf.constant(image), size), np.float32)
  square = images.centre_square(image)
  assert square.shape == (min(h, w), min(h, w), 3)
  on_device = input_pipeline.resize(jnp.asarray(square, jnp.float32)[None], size)[0]
  np.testing.assert_allclose(read, on_device, atol=0.5 + 1e-3)  # Reading rounds to uint8.


def test_load_reports_the_data_statistics_when_mean_and_std_are_far_off(
    mock_tfds, smoke_config, caplog):
  del mock_tfds
  images = input_pipeline.load(smoke_config).train.images  # Random pixels: near CIFAR-10's.
  assert "config.input.mean" not in caplog.text
  smoke_config.input.mean = (30.0, 30.0, 30.0)
  input_pipeline.load(smoke_config)
  mean = ", ".join(f"{m:.1f}" for m in images.reshape(-1, 3).astype(np.float64).mean(0))
  assert f"--config.input.mean='({mean})'" in caplog.text and "--config.input.std='(" in caplog.text


def test_normalization_is_per_channel(mock_tfds, smoke_config):
  del mock_tfds
  images = input_pipeline.load(smoke_config).train.images
  mean, std = images.mean((0, 1, 2)), images.std((0, 1, 2))
  x = np.asarray(input_pipeline.normalize(images, tuple(mean), tuple(std)))
  np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-4)
  np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=1e-4)
  channel = np.asarray(input_pipeline.normalize(images, (1, 2, 3), (4, 5, 6)))[..., 2]
  np.testing.assert_allclose(channel, (images[..., 2] - 3.0) / 6.0, rtol=1e-6)


def _images(n=64, size=8):
  return jax.random.normal(jax.random.key(0), (n, size, size, 3))


def test_flip_is_an_exact_mirror():
  x = _images()
  draws = {"shift": jnp.zeros((64, 2), jnp.int32), "flip": jnp.arange(64) % 2 == 0}
  y = input_pipeline.augment(x, draws, "flip", 4)
  np.testing.assert_array_equal(y[::2], x[::2, :, ::-1])
  np.testing.assert_array_equal(y[1::2], x[1::2])


def test_crop_is_an_exact_shift_of_the_zero_padded_image():
  x = _images()
  draws = sampler.augmentation_draws(jax.random.key(3), 64, 4)
  y = np.asarray(input_pipeline.augment(x, draws, "crop", 4))
  padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i, (dy, dx) in enumerate(np.asarray(draws["shift"])):
    np.testing.assert_array_equal(y[i], padded[i, dy:dy + 8, dx:dx + 8])
  assert len({tuple(s) for s in np.asarray(draws["shift"])}) > 10  # Images drawn independently.


def test_no_image_is_altered_when_augmentation_is_off():
  x = _images()
  draws = sampler.augmentation_draws(jax.random.key(3), 64, 4)
  np.testing.assert_array_equal(input_pipeline.augment(x, draws, "none", 4), x)


def test_cutout_zeroes_a_square_around_each_centre_clipped_at_the_border():
  x = _images(256, 12) + 10.0  # No zeros of its own.
  draws = sampler.augmentation_draws(jax.random.key(5), 256, 4, cutout=5)
  y = np.asarray(input_pipeline.augment(x, draws, "none", 4, cutout=5))
  expected = np.asarray(x).copy()
  for i, (cy, cx) in enumerate(np.floor(np.asarray(draws["cutout"]) * 12).astype(int)):
    expected[i, max(cy - 2, 0):cy + 3, max(cx - 2, 0):cx + 3] = 0
  np.testing.assert_array_equal(y, expected)
  erased = (y == 0).all(-1).sum((1, 2))
  assert erased.max() == 25 and erased.min() == 9  # Whole squares inside, 3x3 in the corners.


def test_resize_is_the_resolution_multiplier():
  x = _images(2, 32)
  assert input_pipeline.resize(x, 24).shape == (2, 24, 24, 3)
  assert input_pipeline.resize(x, 32) is x


@pytest.mark.parametrize("n,batch", [(10_000, 128), (10_000, 100), (50, 16), (7, 8)])
def test_eval_batches_cover_every_example_exactly_once(n, batch):
  split = input_pipeline.Split(np.arange(n, dtype=np.uint8).repeat(3).reshape(n, 1, 1, 3),
                               np.arange(n, dtype=np.int32))
  images, labels, mask = input_pipeline.eval_batches(split, batch)
  assert images.shape[:2] == labels.shape == mask.shape and labels.shape[1] == batch
  counted = labels.reshape(-1)[mask.reshape(-1) == 1]
  np.testing.assert_array_equal(np.sort(counted), np.arange(n))
  assert mask.sum() == n


@pytest.mark.parametrize("overrides,match", [
    ({"augment.name": "rotate"}, "config.augment.name"),
    ({"input.image_size": 7}, "config.input.image_size"),
    ({"input.batch_size": 12},
     "config.input.batch_size=12 must be a positive multiple of the 8 devices"),
    ({"augment.name": "crop", "augment.alternate_flips": True},
     "config.augment.alternate_flips=True with config.augment.name='crop': there are no flips"),
    ({"augment.cutout": -8}, "config.augment.cutout=-8: expected the side in pixels"),
    ({"augment.erase_prob": 1.5}, r"config.augment.erase_prob=1.5: must be a probability"),
    ({"augment.erase_mode": "noise"}, "config.augment.erase_mode='noise': expected one of")])
def test_bad_data_config_is_rejected(smoke_config, overrides, match):
  smoke_config.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=match):
    input_pipeline.check_config(smoke_config, num_devices=8)


def test_unknown_and_non_image_datasets_are_rejected(smoke_config):
  smoke_config.data.name = "cifar11"
  with pytest.raises(ValueError, match="'cifar11' is not a tensorflow-datasets name"):
    input_pipeline.load(smoke_config)
  smoke_config.data.name = "imdb_reviews"
  with pytest.raises(ValueError, match="not an image classification dataset"):
    input_pipeline.load(smoke_config)


def test_missing_dataset_names_the_dir_and_both_fixes_in_one_line(smoke_config, tmp_path):
  smoke_config.data.dir = str(tmp_path)
  with pytest.raises(input_pipeline.DatasetUnavailableError) as e:
    input_pipeline.load(smoke_config)
  message = str(e.value)
  assert message.startswith(f"Dataset 'cifar10' is not prepared in {tmp_path} (and "
                            "config.data.download=False)") and "\n" not in message
  assert "--config.data.dir (or $TFDS_DATA_DIR)" in message
  assert "--config.data.download=True" in message


@pytest.mark.skipif(not (SHARED_TFDS / "cifar10").exists(),
                    reason="no prepared CIFAR-10 in ../shared")
def test_splits_are_tfds_slices_and_an_unknown_one_is_named(smoke_config):
  smoke_config.update_from_flattened_dict({"data.dir": str(SHARED_TFDS),
                                           "data.train_examples": None, "data.eval_examples": None,
                                           "data.train_split": "train[:1000]",
                                           "data.eval_split": "train[49500:]"})
  data = input_pipeline.load(smoke_config)
  assert len(data.train.labels) == 1000 and len(data.test.labels) == 500
  smoke_config.data.eval_split = "validation"
  with pytest.raises(input_pipeline.UnknownSplitError,
                     match=r"config.data.eval_split='validation': Unknown split 'validation'.*"
                     r"--config.data.eval_split='train\[90%:\]'"):
    input_pipeline.load(smoke_config)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_TFDS / "cifar10").exists(),
                    reason="no prepared CIFAR-10 in ../shared")
def test_real_cifar10_from_shared_folder(smoke_config):
  smoke_config.data.dir = str(SHARED_TFDS)
  smoke_config.data.train_examples = None
  smoke_config.data.eval_examples = None
  data = input_pipeline.load(smoke_config)
  assert data.train.images.shape == (50_000, 32, 32, 3)
  assert data.test.images.shape == (10_000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(data.train.labels), [5000] * 10)
  np.testing.assert_allclose(data.train.images.mean((0, 1, 2)), smoke_config.input.mean, atol=0.1)
