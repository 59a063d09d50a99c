r"""Classifies images with a trained workdir's latest checkpoint: top-5 classes per image.

  python -m mobilenet_jax.predict --workdir=workdirs/quick cat.png dog.jpg
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mobilenet_jax import errors, images, workdirs  # pylint: disable=g-import-not-at-top



def predict(workdir: str, paths, top: int = 5,
            raw: bool = False) -> list[list[tuple[str, float]]]:
  """For each image, the `top` (label name, probability) pairs, most probable first; `raw`:
  with the weights, not their average (`workdirs.load`)."""
  pictures = [images.read(path) for path in paths]  # A bad file fails before loading.
  trained = workdirs.load(workdir, raw)
  logits = workdirs.logits_fn(trained)
  results = []
  for picture in pictures:
    image = images.fit(picture, trained.config)
    probs = np.asarray(jax.nn.softmax(logits(image[None]))[0])
    order = np.argsort(-probs)[:top]
    results.append([(trained.label_names[i], float(probs[i])) for i in order])
  return results


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of a restore at INFO.
  paths = argv[1:]
  if not paths:
    raise app.UsageError("Name at least one image (JPEG, PNG, BMP or WebP).")
  try:
    results = predict(flags.FLAGS.workdir, paths, flags.FLAGS.top, flags.FLAGS.raw)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for path, top in zip(paths, results):
    print(path)
    for name, p in top:
      print(f"  {p:7.2%}  {name}")
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A workdir trained by run.py.", required=True)
  flags.DEFINE_integer("top", 5, "How many classes to print per image.")
  flags.DEFINE_bool("raw", False, workdirs.RAW_FLAG_HELP)
  app.run(main)
