"""`run.py` on tfds mock data, for tests that need a separate process (devices, resume, signals).

The examples are `tfds.testing.mock_data`'s, taken from its numpy generator: mock_data itself
reads them back through TensorFlow, whose import would cost each of the suite's ~50 launches
~5 s. Reading tfds is tested in-process (test_input_pipeline).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from mobilenet_jax import input_pipeline  # pylint: disable=g-import-not-at-top

NUM_EXAMPLES = 64  # Per split; conftest's `mock_tfds` too.


def mock_load(config) -> input_pipeline.Dataset:
  """`input_pipeline.load` under `tfds.testing.mock_data(num_examples=NUM_EXAMPLES)`: the
  same examples, from the generator it reads back through TensorFlow (test_input_pipeline
  checks they are equal). Fixed-size RGB datasets only."""
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top
  features = input_pipeline._builder(config).info.features  # pylint: disable=protected-access
  if features["image"].shape[-1] != 3 or None in features["image"].shape:
    raise ValueError(f"mock_run.py serves fixed-size RGB datasets, not {config.dataset!r}.")
  examples = list(mocking.RandomFakeGenerator(features, NUM_EXAMPLES))

  def split(limit):
    kept = examples[:limit]
    return input_pipeline.Split(np.stack([e["image"] for e in kept]),
                                np.asarray([e["label"] for e in kept], np.int32))

  label = features["label"]
  return input_pipeline.Dataset(split(config.get("train_examples")),
                                split(config.get("eval_examples")),
                                label.num_classes, tuple(label.names))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  import run  # pylint: disable=g-import-not-at-top
  input_pipeline.load = mock_load
  app.run(run.main)
