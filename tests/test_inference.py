"""Inference: test-time views against the model run on each view, CPU sub-batches."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fresh_state as _state, random_batch as _batch
from mobilenet_jax import inference, input_pipeline


def test_eval_flip_averages_the_logits_of_each_image_and_its_mirror(smoke_config):
  state, images = _state(smoke_config), _batch(smoke_config)["image"]
  logits = jax.jit(lambda x, flip: inference.eval_logits(
      state.apply_fn, {"params": state.params, "batch_stats": state.batch_stats}, x, smoke_config,
      inference.Views(flip=flip)), static_argnums=1)
  plain, mirrored = logits(images, False), logits(images[:, :, ::-1], False)
  averaged = logits(images, True)
  scale = float(np.abs(plain).max())  # Logits of an untrained network are small.
  np.testing.assert_allclose(averaged, (plain + mirrored) / 2, rtol=1e-4, atol=1e-4 * scale)
  np.testing.assert_allclose(logits(images[:, :, ::-1], True), averaged, rtol=1e-4,
                             atol=1e-4 * scale)
  assert np.abs(averaged - plain).max() > 0.05 * scale  # Not a no-op: the net is not symmetric.


def test_eval_shift_averages_a_3x3_grid_of_translations_of_each_view(smoke_config):
  state, images = _state(smoke_config), _batch(smoke_config, n=5)["image"]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  x = input_pipeline.preprocess(images, smoke_config)
  views = [np.roll(np.pad(v, ((0, 0), (2, 2), (2, 2), (0, 0))), (dy, dx), (1, 2))[:, 2:-2, 2:-2]
           for v in (x, x[:, :, ::-1]) for dy in (-2, 0, 2) for dx in (-2, 0, 2)]
  apply = jax.jit(lambda x: state.apply_fn(variables, x, train=False))
  expected = np.mean([apply(v) for v in views], axis=0)
  logits = jax.jit(lambda x, views: inference.eval_logits(state.apply_fn, variables, x,
                                                          smoke_config, views), static_argnums=1)
  shifted = logits(images, inference.Views(flip=True, shift=2))
  scale = float(np.abs(expected).max())
  np.testing.assert_allclose(shifted, expected, rtol=1e-4, atol=1e-4 * scale)
  flipped_only = logits(images, inference.Views(flip=True))
  assert np.abs(shifted - flipped_only).max() > 0.05 * scale  # The translations do count.


def test_translate_shifts_with_zero_fill():
  x = jnp.arange(1, 17, dtype=jnp.float32).reshape(1, 4, 4, 1)
  moved = np.asarray(input_pipeline.translate(x, 1, -2))[0, :, :, 0]
  np.testing.assert_array_equal(moved, [[0, 0, 0, 0], [3, 4, 0, 0], [7, 8, 0, 0], [11, 12, 0, 0]])


def test_in_chunks_keeps_row_order_and_pads_a_partial_last_chunk():
  x = jnp.arange(13 * 2, dtype=jnp.float32).reshape(13, 2)
  calls = []
  def per_row(chunk):
    calls.append(chunk.shape)
    return chunk * 10 + 1
  np.testing.assert_array_equal(inference.in_chunks(per_row, x, 4), x * 10 + 1)
  assert calls == [(4, 2)]  # Traced once by lax.map: 4 chunks of 4 rows (3 rows of padding).
  np.testing.assert_array_equal(inference.in_chunks(per_row, x, 0), x * 10 + 1)
  assert calls[-1] == (13, 2)


def test_chunked_inference_equals_whole_batch_inference(smoke_config):
  state, images = _state(smoke_config), _batch(smoke_config, n=23)["image"]
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  logits = {}
  for chunk in (0, 5):  # 46 rows (flipped too): chunks of 5, the last one padded.
    smoke_config.eval.chunk = chunk
    logits[chunk] = jax.jit(lambda x: inference.eval_logits(
        state.apply_fn, variables, x, smoke_config, inference.Views(flip=True)))(images)
  assert logits[0].shape == (23, 10)
  scale = float(np.abs(logits[0]).max())
  np.testing.assert_allclose(logits[5], logits[0], rtol=1e-5, atol=1e-5 * scale)


def test_inference_chunk_is_automatic_per_backend(smoke_config):
  assert smoke_config.eval.chunk is None
  assert inference.inference_chunk(smoke_config, "gpu") == 0
  smoke_config.eval.chunk = 8
  assert inference.inference_chunk(smoke_config, "gpu") == 8
  assert inference.inference_chunk(smoke_config, "cpu") == 8


@pytest.mark.parametrize("preset, overrides, chunk", [
    ("torch", {}, 32),  # Block 1's output: 32x32x64 floats, 256 KiB an image; 8 MiB hold 32.
    ("torch", {"model.alpha": 0.5}, 64),  # 128 KiB: 64.
    ("torch", {"model.dtype": "bfloat16"}, 64),  # Half the bytes.
    ("quick", {}, 64),  # Stride 2, width 1.5: 16x16x96 floats, 96 KiB: 85 fit, so 64.
    ("", {}, 64),  # 64 KiB: 128 fit, capped at 64.
    ("", {"input.image_size": 224}, 2),  # 112x112x64 floats, 3.1 MiB: 2.
    ("", {"input.image_size": 1024}, 1),  # 64 MiB: one image at a time.
])
def test_cpu_inference_chunk_keeps_the_largest_activation_within_8_mib(preset, overrides, chunk):
  from configs import cifar  # pylint: disable=g-import-not-at-top
  config = cifar.get_config(preset)
  config.update_from_flattened_dict(overrides)
  assert inference.inference_chunk(config, "cpu") == chunk


def test_training_folders_and_predict_read_the_same_formats_alike(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import errors, folders, images  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(0).integers(0, 256, (9, 13, 3), np.uint8)
  lossless = {".png": {}, ".bmp": {}, ".webp": {"lossless": True}}
  paths = [str(tmp_path / f"a{ext}") for ext in lossless]
  for path, (_, options) in zip(paths, lossless.items()):
    Image.fromarray(pixels).save(path, **options)
  Image.fromarray(pixels).convert("L").save(tmp_path / "grey.jpg")
  source = folders.FileSource((*paths, str(tmp_path / "grey.jpg")), np.zeros(4, np.int32))
  for i, path in enumerate(paths):
    np.testing.assert_array_equal(images.read(path), pixels)  # What predict reads.
    np.testing.assert_array_equal(source.read(i), pixels)  # What a folder trains on.
  grey = images.read(str(tmp_path / "grey.jpg"))
  assert grey.shape == (9, 13, 3) and (grey[..., 0] == grey[..., 2]).all()
  Image.fromarray(pixels).save(tmp_path / "a.gif")
  with pytest.raises(errors.FileError, match=r"a\.gif: a GIF image; JPEG, PNG, BMP or WebP"):
    images.read(str(tmp_path / "a.gif"))
  with pytest.raises(folders.FolderError, match="a.txt: not a readable image.*Remove or replace"):
    (tmp_path / "a.txt").write_text("not an image")
    folders.FileSource((str(tmp_path / "a.txt"),), np.zeros(1, np.int32)).read(0)
