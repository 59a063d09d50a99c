"""Deployment: TFLite export matches JAX, predict prints class names, eval mode, clear errors."""
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SHARED_TFDS, inference_logits, restore_latest, run_mocked, smoke_args
from mobilenet_jax import checkpoints, export, input_pipeline, models, workdirs

pytestmark = pytest.mark.slow  # Trains, or launches processes: `-m 'not slow'` skips it.

# The int8 test's training images: 10,000 gave 97.8% top-1 agreement on 500 test images, 5,000
# only 93.2% (too little trained, margins too thin for int8), against the 95% it asks.
TRAIN_IMAGES = 10_000
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
  expected = inference_logits(model, variables, input_pipeline.normalize(pixels, MEAN, STD))
  tflite = export.to_tflite(export.tf_function(config, variables, 32, MEAN, STD))
  got = _interpret(tflite, pixels)
  assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_workdir_saved_before_new_config_fields_loads_with_their_old_behaviour(
    trained_workdir, tmp_path):
  old, explicit = tmp_path / "old", tmp_path / "explicit"
  config = json.loads((trained_workdir / "config.json").read_text())
  # Workdirs from before config.model.padding were trained with PyTorch's padding and BatchNorm,
  # and before config.ema, without a weight average: their checkpoints hold none.
  config["model"].update(padding="symmetric", activation="relu", bn_momentum=0.9, bn_epsilon=1e-5)
  config["ema"]["decay"] = 0.0
  state = restore_latest(trained_workdir, workdirs.load_config(str(trained_workdir)))
  for workdir in (old, explicit):
    shutil.copytree(trained_workdir, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    saver = checkpoints.Checkpointer(workdirs.checkpoint_dir(str(workdir)), 1, writer=True)
    saver.save(state.replace(ema=None))
    saver.close()
  (explicit / "config.json").write_text(json.dumps(config))
  # Those fields came before the config's groups: a workdir without them has a flat config.
  config = {old_name: config[new.split(".")[0]][new.split(".")[1]]
            for old_name, new in workdirs.RENAMES.items()} | {
                k: v for k, v in config.items() if k in ("mode", "seed", "num_epochs",
                                                         "parallel", "init_from", "model")}
  del config["eval_flip"], config["model"]["kernel_init"], config["inference_chunk"]
  del config["eval_shift"], config["train_split"], config["eval_split"]
  for field in ("padding", "activation", "bn_momentum", "bn_epsilon"):
    del config["model"][field]
  (old / "config.json").write_text(json.dumps(config))
  trained = workdirs.load(str(old))
  assert trained.config.eval.flip is False and trained.config.model.kernel_init == "he_normal"
  assert trained.config.eval.chunk is None and trained.config.eval.shift == 0
  assert (trained.config.data.train_split, trained.config.data.eval_split) == ("train", "test")
  assert trained.config.model.padding == "symmetric" and trained.config.model.bn_epsilon == 1e-5
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8))
  np.testing.assert_array_equal(workdirs.logits_fn(trained)(images),
                                workdirs.logits_fn(workdirs.load(str(explicit)))(images))


def _predict(workdir, *args):
  return subprocess.run([sys.executable, "-m", "mobilenet_jax.predict", f"--workdir={workdir}",
                         *map(str, args)], cwd=ROOT, capture_output=True, text=True, check=False)


def _expected_top(trained, image, top):
  """The `top` lines predict should print for an RGB uint8 image, computed with numpy from the
  model's logits on the image's centre square."""
  config = trained.config
  h, w = image.shape[:2]
  side = min(h, w)
  square = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
  x = input_pipeline.resize(
      input_pipeline.normalize(square[None], config.input.mean, config.input.std),
      config.input.image_size)
  logits = inference_logits(trained.model, trained.variables, x)[0].astype(np.float64)
  probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
  order = sorted(range(len(probs)), key=lambda i: -probs[i])[:top]
  return [f"  {probs[i]:7.2%}  {trained.label_names[i]}" for i in order]


def test_predict_prints_the_most_probable_classes_for_png_jpeg_gray_and_rgba(
    trained_workdir, tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (32, 32, 3), np.uint8)
  photo = np.asarray(Image.fromarray(rgb).resize((64, 48)))
  images = {"rgb.png": rgb, "photo.jpg": photo, "gray.png": rgb[..., 0],
            "rgba.png": np.dstack([rgb, rgb[..., :1]])}
  paths = [tmp_path / name for name in images]
  for path, image in zip(paths, images.values()):
    Image.fromarray(image).save(path)
  as_read = {"rgb.png": rgb, "photo.jpg": np.asarray(Image.open(paths[1]).convert("RGB")),
             "gray.png": np.repeat(rgb[..., :1], 3, -1), "rgba.png": rgb}
  result = _predict(trained_workdir, *paths, "--top=3")
  assert result.returncode == 0, result.stderr[-3000:]
  trained, expected = workdirs.load(str(trained_workdir)), []
  for path, image in zip(paths, as_read.values()):
    expected += [str(path), *_expected_top(trained, image, 3)]
  assert result.stdout.splitlines() == expected


def test_predict_export_and_convert_read_the_weight_average_and_raw_reads_the_weights(
    trained_workdir, tmp_path):
  # The shared workdir trained with config.ema.decay=0.5: its checkpoint holds both.
  config = workdirs.load_config(str(trained_workdir))
  state = restore_latest(trained_workdir, config)
  kept = {"ema": state.ema, "raw": {"params": state.params, "batch_stats": state.batch_stats}}
  image = np.random.default_rng(2).integers(0, 256, (16, 16, 3), np.uint8)
  Image.fromarray(image).save(tmp_path / "image.png")
  printed = {}
  for weights, flags in (("ema", []), ("raw", ["--raw"])):
    loaded = workdirs.load(str(trained_workdir), raw=weights == "raw")  # export, convert --out
    for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(kept[weights])):
      np.testing.assert_array_equal(a, b)
    result = _predict(trained_workdir, tmp_path / "image.png", "--top=10", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    printed[weights] = result.stdout.splitlines()[1:]
    expected = workdirs.Trained(config, models.create_model(config.model), kept[weights],
                                loaded.label_names, int(state.step))
    assert printed[weights] == _expected_top(expected, image, 10)
  assert printed["ema"] != printed["raw"]


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


def test_eval_mode_without_checkpoint_says_so(tmp_path):
  from configs import cifar  # pylint: disable=g-import-not-at-top
  (tmp_path / "config.json").write_text(cifar.get_config("smoke").to_json())
  result = run_mocked(*smoke_args(tmp_path, "--config.mode=eval"))
  assert result.returncode == 1 and "error: No checkpoints/ in" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "checkpoints").exists()


def _export(*args):
  return subprocess.run([sys.executable, "-m", "mobilenet_jax.export", *map(str, args)],
                        cwd=ROOT, capture_output=True, text=True, check=False)


def test_export_cli_writes_tflite_and_savedmodel_with_the_models_logits(trained_workdir, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  trained = workdirs.load(str(trained_workdir))
  pixels = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype(np.float32)
  expected = inference_logits(trained.model, trained.variables, input_pipeline.normalize(
      pixels, trained.config.input.mean, trained.config.input.std))
  tflite, saved = tmp_path / "m.tflite", tmp_path / "saved"
  for fmt, out in (("tflite", tflite), ("savedmodel", saved)):
    result = _export(f"--workdir={trained_workdir}", f"--format={fmt}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {out}" in result.stdout
  served = tf.saved_model.load(str(saved)).serve
  for got in (_interpret(tflite.read_bytes(), pixels),
              np.concatenate([served(tf.constant(p[None])).numpy() for p in pixels])):
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_export_errors_are_one_line(trained_workdir, tmp_path):
  result = _export(f"--workdir={trained_workdir}", "--format=savedmodel", "--quantize=int8",
                   f"--out={tmp_path / 'saved'}")
  assert result.returncode == 1 and result.stderr.strip() == (
      "error: --quantize=int8 applies to --format=tflite only.")
  result = _export(f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'm.tflite'}")
  assert result.returncode == 1 and "the workdir must be a folder that" in result.stderr
  assert "Traceback" not in result.stderr and not (tmp_path / "m.tflite").exists()


@pytest.mark.skipif(not (SHARED_TFDS / "cifar10").exists(),
                    reason="no prepared CIFAR-10 in ../shared")
def test_int8_tflite_agrees_with_jax_on_real_test_images(tmp_path):
  # A model trained in this process for 3 epochs on TRAIN_IMAGES real CIFAR-10 images: its
  # int8 TFLite export's top-1 must agree with JAX's on 500 real test images, read once.
  from configs import cifar  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import train  # pylint: disable=g-import-not-at-top
  config = cifar.get_config("quick")
  config.update_from_flattened_dict({"data.dir": str(SHARED_TFDS), "data.download": False,
                                     "num_epochs": 3, "schedule.boundaries": (1, 2),
                                     "schedule.rates": (0.08, 0.008),
                                     "data.train_examples": TRAIN_IMAGES, "data.eval_examples": 500,
                                     "log.progress_bar": False, "eval.flip": False,
                                     "eval.shift": 0})
  config.model.update(stem_stride=2, alpha=0.5, use_bias=False)
  train.train_and_evaluate(config, str(tmp_path))
  out = tmp_path / "int8.tflite"
  export.export(str(tmp_path), "tflite", str(out), quantize="int8", calibration_examples=200)
  trained = workdirs.load(str(tmp_path))
  images = input_pipeline.load(trained.config).test.images
  jax_top1 = np.argmax(np.asarray(workdirs.logits_fn(trained)(jnp.asarray(images))), -1)
  tflite_top1 = np.argmax(_interpret(out.read_bytes(), images.astype(np.float32)), -1)
  agreement = float(np.mean(jax_top1 == tflite_top1))
  print(f"int8 top-1 agreement with JAX: {agreement:.1%}")
  assert agreement >= 0.95, agreement


def test_a_workdir_written_before_lr_values_keeps_loading(tmp_path):
  old = json.loads((pathlib.Path(__file__).parent / "data" / "config_flat_quick.json").read_text())
  del old["lr_values"], old["eval_crop"], old["init_from"], old["model"]["dropout"]
  old["lr_decay"] = [5.0, 0.4, 0.4, 0.3, 0.3]
  (tmp_path / "config.json").write_text(json.dumps(old))
  config = workdirs.load_config(str(tmp_path))
  np.testing.assert_allclose(config.schedule.rates, [0.08, 0.032, 0.0128, 0.00384, 0.001152])
  assert "lr_decay" not in config and config.model.dropout == 0.0 and config.init_from is None
