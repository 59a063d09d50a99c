r"""Exports a trained workdir's model for deployment: TFLite (float32 or int8) or a SavedModel.

  python -m mobilenet_jax.export --workdir=workdirs/quick --format=tflite --out=mobilenet.tflite
  python -m mobilenet_jax.export --workdir=workdirs/quick --format=tflite --quantize=int8 \
      --out=mobilenet_int8.tflite
  python -m mobilenet_jax.export --workdir=workdirs/quick --format=savedmodel --out=saved_model/

The exported function takes float32 RGB pixels in [0, 255], shape (1, S, S, 3) with S the
configured `image_size`, and returns logits; normalization is inside it and BatchNorm is in
inference mode. The route is the one LiteRT documents for JAX: `jax2tf` to a TensorFlow
function, then TensorFlow's converter. Convolutions are exported as `lax` convolutions (the
grouped depthwise conv becomes TFLite's DEPTHWISE_CONV_2D), whatever `config.model.conv` says.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

# pylint: disable-next=g-import-not-at-top
from mobilenet_jax import errors, input_pipeline, models, workdirs

FORMATS = ("tflite", "savedmodel")


def tf_function(model_config, variables, image_size: int, mean, std):
  """The inference function as a TensorFlow function of raw float32 pixels."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  model = models.create_model(model_config).clone(conv_impl="lax")
  def infer(pixels):
    return model.apply(variables, input_pipeline.normalize(pixels, mean, std), train=False)
  return tf.function(jax2tf.convert(infer, with_gradient=False), autograph=False,
                     input_signature=[tf.TensorSpec((1, image_size, image_size, 3), tf.float32,
                                                    name="pixels")])


def to_tflite(fn, calibration_images=None) -> bytes:
  """Converts; with `calibration_images` (NHWC, pixels in [0, 255]), int8 post-training quant."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
  if calibration_images is not None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None].astype(np.float32)]
                                                 for image in calibration_images)
  return converter.convert()


def export(workdir: str, fmt: str, out: str, quantize: str = "none",
           calibration_examples: int = 200, raw: bool = False) -> str:
  """Writes `out`; `raw`: the weights, not their average (`workdirs.load`)."""
  if fmt not in FORMATS:
    raise errors.ConfigError(f"--format={fmt}: expected one of {FORMATS}.")
  if quantize != "none" and fmt != "tflite":
    raise errors.ConfigError("--quantize=int8 applies to --format=tflite only.")
  trained = workdirs.load(workdir, raw)
  c = trained.config
  fn = tf_function(c.model, trained.variables, c.input.image_size, tuple(c.input.mean),
                   tuple(c.input.std))
  if fmt == "savedmodel":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    module = tf.Module()
    module.serve = fn
    tf.saved_model.save(module, out, signatures=fn.get_concrete_function())
    return out
  calibration = None
  if quantize == "int8":
    calibration_config = c.copy_and_resolve_references()
    calibration_config.data.train_examples = calibration_examples
    images = input_pipeline.load(calibration_config).train.images
    calibration = np.asarray(input_pipeline.resize(images.astype(np.float32), c.input.image_size))
  with open(out, "wb") as f:
    f.write(to_tflite(fn, calibration))
  return out


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a restore at INFO.
  del argv
  f = flags.FLAGS
  try:
    path = export(f.workdir, f.format, f.out, f.quantize, f.calibration_examples,
                  f.raw)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A workdir trained by run.py.", required=True)
  flags.DEFINE_enum("format", "tflite", FORMATS, "Output format.")
  flags.DEFINE_string("out", None, "Output file (tflite) or folder (savedmodel).", required=True)
  flags.DEFINE_enum("quantize", "none", ["none", "int8"],
                    "int8: post-training quantization of weights and activations (tflite only).")
  flags.DEFINE_integer("calibration_examples", 200, "Training images that calibrate int8 ranges.")
  flags.DEFINE_bool("raw", False, workdirs.RAW_FLAG_HELP)
  app.run(main)
