"""`run.py` on tfds mock data, for tests that need a separate process (devices, resume)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
from absl import app  # pylint: disable=g-import-not-at-top

import run  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  with tfds.testing.mock_data(num_examples=int(os.environ.get("MOCK_EXAMPLES", "64"))):
    app.run(run.main)
