"""Deployment: TFLite export matches JAX, predict prints class names, eval mode, clear errors."""
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SHARED_TFDS, run_mocked
from mobilenet_jax import export, input_pipeline, models, workdirs

MEAN, STD = (125.307, 122.95, 113.865), (62.9932, 62.0887, 66.7048)


def _interpret(tflite: bytes, pixels: np.ndarray) -> np.ndarray:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  interpreter = tf.lite.Interpreter(model_content=tflite)
  interpreter.allocate_tensors()
  inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
  results = []
  for image in pixels:
    interpreter.set_tensor(inp["index"], image[None].astype(np.float32))
    interpreter.invoke()
    results.append(interpreter.get_tensor(out["index"])[0])
  return np.stack(results)


@pytest.mark.parametrize("stem,alpha", [(2, 1.0), (1, 0.5), (2, 0.5)])
def test_tflite_float_logits_match_jax(stem, alpha):
  from configs import cifar  # pylint: disable=g-import-not-at-top
  config = cifar.get_config("" if stem == 2 else "torch").model  # Each reference's layout.
  config.alpha = alpha
  model = models.create_model(config)
  pixels = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(pixels)
  # Non-trivial BatchNorm statistics, as after training: one train-mode pass updates them.
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, input_pipeline.normalize(pixels, MEAN, STD))
  variables = {**variables, **updates}
  expected = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, input_pipeline.normalize(pixels, MEAN, STD)))
  tflite = export.to_tflite(export.tf_function(config, variables, 32, MEAN, STD))
  got = _interpret(tflite, pixels)
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  result = run_mocked("--config=configs/cifar.py:smoke", "--config.download=False",
                      "--config.progress_bar=False", f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_workdir_saved_before_new_config_fields_loads_with_their_old_behaviour(
    trained_workdir, tmp_path):
  old, explicit = tmp_path / "old", tmp_path / "explicit"
  config = json.loads((trained_workdir / "config.json").read_text())
  # Workdirs from before config.model.padding were trained with PyTorch's padding and BatchNorm.
  config["model"].update(padding="symmetric", activation="relu", bn_momentum=0.9, bn_epsilon=1e-5)
  for workdir in (old, explicit):
    shutil.copytree(trained_workdir, workdir)
  (explicit / "config.json").write_text(json.dumps(config))
  del config["eval_flip"], config["model"]["kernel_init"], config["inference_chunk"]
  del config["eval_shift"], config["train_split"], config["eval_split"]
  for field in ("padding", "activation", "bn_momentum", "bn_epsilon"):
    del config["model"][field]
  (old / "config.json").write_text(json.dumps(config))
  trained = workdirs.load(str(old))
  assert trained.config.eval_flip is False and trained.config.model.kernel_init == "he_normal"
  assert trained.config.inference_chunk is None and trained.config.eval_shift == 0
  assert (trained.config.train_split, trained.config.eval_split) == ("train", "test")
  assert trained.config.model.padding == "symmetric" and trained.config.model.bn_epsilon == 1e-5
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8))
  np.testing.assert_array_equal(workdirs.logits_fn(trained)(images),
                                workdirs.logits_fn(workdirs.load(str(explicit)))(images))


def _predict(workdir, *paths):
  return subprocess.run([sys.executable, "-m", "mobilenet_jax.predict", f"--workdir={workdir}",
                         *map(str, paths)], cwd=ROOT, capture_output=True, text=True, check=False)


def test_predict_prints_top5_class_names_for_png_jpeg_gray_and_rgba(trained_workdir, tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (32, 32, 3), np.uint8)
  paths = [tmp_path / name for name in ("rgb.png", "photo.jpg", "gray.png", "rgba.png")]
  Image.fromarray(rgb).save(paths[0])
  Image.fromarray(rgb).resize((64, 48)).save(paths[1])
  Image.fromarray(rgb[..., 0]).save(paths[2])
  Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(paths[3])
  result = _predict(trained_workdir, *paths)
  assert result.returncode == 0, result.stderr[-3000:]
  names = json.loads((trained_workdir / "label_names.json").read_text())
  lines = result.stdout.splitlines()
  for path in paths:
    block = lines[lines.index(str(path)) + 1:lines.index(str(path)) + 6]
    assert len(block) == 5 and all(line.split()[-1] in names for line in block)
    assert abs(sum(float(line.split()[0].rstrip("%")) for line in block) - 100) < 100


def test_predict_classifies_the_centre_square_of_a_non_square_image(trained_workdir, tmp_path):
  rng = np.random.default_rng(1)
  square = rng.integers(0, 256, (32, 32, 3), np.uint8)
  wide = np.concatenate([rng.integers(0, 256, (32, 7, 3), np.uint8), square,
                         rng.integers(0, 256, (32, 8, 3), np.uint8)], axis=1)
  Image.fromarray(square).save(tmp_path / "square.png")
  Image.fromarray(wide).save(tmp_path / "wide.png")
  result = _predict(trained_workdir, tmp_path / "square.png", tmp_path / "wide.png")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0].endswith("square.png") and lines[6].endswith("wide.png")
  assert lines[1:6] == lines[7:12]


def test_predict_errors_are_clear(trained_workdir, tmp_path):
  bad = tmp_path / "notes.png"
  bad.write_text("not an image")
  result = _predict(trained_workdir, bad)
  assert result.returncode == 1 and "not a readable image" in result.stderr
  assert "Traceback" not in result.stderr
  result = _predict(trained_workdir, tmp_path / "missing.png")
  assert result.returncode == 1 and "no such file" in result.stderr
  (tmp_path / "untrained").mkdir()
  good = tmp_path / "good.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
  result = _predict(tmp_path / "untrained", good)
  assert result.returncode == 1 and "the workdir must be a folder that" in result.stderr


def test_eval_mode_reports_the_trained_accuracy(trained_workdir):
  result = run_mocked("--config=configs/cifar.py:smoke", "--config.download=False",
                      "--config.mode=eval", f"--workdir={trained_workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  accuracy = json.loads((trained_workdir / "results.json").read_text())["test_accuracy"]
  assert f"step 8: test accuracy {accuracy:.4f} on 40 examples" in result.stdout


def test_eval_mode_without_checkpoint_says_so(tmp_path):
  from configs import cifar  # pylint: disable=g-import-not-at-top
  (tmp_path / "config.json").write_text(cifar.get_config("smoke").to_json())
  result = run_mocked("--config=configs/cifar.py:smoke", "--config.download=False",
                      "--config.mode=eval", f"--workdir={tmp_path}")
  assert result.returncode == 1 and "error: No checkpoints/ in" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "checkpoints").exists()


def test_export_cli_writes_tflite_and_savedmodel(trained_workdir, tmp_path):
  for fmt, out in (("tflite", tmp_path / "m.tflite"), ("savedmodel", tmp_path / "saved")):
    result = subprocess.run([sys.executable, "-m", "mobilenet_jax.export",
                             f"--workdir={trained_workdir}", f"--format={fmt}", f"--out={out}"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.exists() and f"wrote {out}" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_TFDS / "cifar10").exists(),
                    reason="no prepared CIFAR-10 in ../shared")
def test_int8_tflite_agrees_with_jax_on_real_test_images(tmp_path):
  # 3 epochs over 10,000 real training images (not all 50,000): 97.0% agreement on 500 test
  # images, as 97.4% after the full split, in a fifth of the time.
  args = ["--config=configs/cifar.py:quick", f"--config.data_dir={SHARED_TFDS}",
          "--config.download=False", "--config.num_epochs=3", "--config.lr_boundaries=(1, 2)",
          "--config.lr_values=(0.08, 0.008)", "--config.model.stem_stride=2",
          "--config.model.alpha=0.5", "--config.model.use_bias=False",
          "--config.train_examples=10000", "--config.eval_examples=500",
          "--config.progress_bar=False", f"--workdir={tmp_path}",
          # The export is the plain model: compare it with the same, without test-time views.
          "--config.eval_flip=False", "--config.eval_shift=0"]
  result = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = tmp_path / "int8.tflite"
  export.export(str(tmp_path), "tflite", str(out), quantize="int8", calibration_examples=200)
  trained = workdirs.load(str(tmp_path))
  images = input_pipeline.load(trained.config).test.images  # eval_examples=500
  jax_top1 = np.argmax(np.asarray(workdirs.logits_fn(trained)(jnp.asarray(images))), -1)
  tflite_top1 = np.argmax(_interpret(out.read_bytes(), images.astype(np.float32)), -1)
  agreement = float(np.mean(jax_top1 == tflite_top1))
  print(f"int8 top-1 agreement with JAX: {agreement:.1%}")
  assert agreement >= 0.95, agreement


def test_a_workdir_written_before_lr_values_keeps_loading(tmp_path):
  from configs import cifar  # pylint: disable=g-import-not-at-top
  old = json.loads(cifar.get_config("quick").to_json())
  del old["lr_values"], old["eval_crop"], old["init_from"], old["model"]["dropout"]
  old["lr_decay"] = [5.0, 0.4, 0.4, 0.3, 0.3]
  (tmp_path / "config.json").write_text(json.dumps(old))
  config = workdirs.load_config(str(tmp_path))
  np.testing.assert_allclose(config.lr_values, [0.08, 0.032, 0.0128, 0.00384, 0.001152])
  assert "lr_decay" not in config and config.model.dropout == 0.0 and config.init_from is None
