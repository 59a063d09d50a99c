"""`run.py` as the tests launch it in a separate process (devices, resume, signals).

Two differences, both for speed:
- tfds datasets are `tfds.testing.mock_data`'s examples, taken from its numpy generator:
  mock_data itself reads them back through TensorFlow, whose import would cost each of the
  suite's ~50 launches ~5 s. Reading tfds is tested in-process (test_input_pipeline);
  `folder:` datasets are read as run.py reads them.
- All processes of a multi-process run share the compilation cache (see
  `share_the_compilation_cache_between_processes`).
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
    raise ValueError(f"mock_run.py serves fixed-size RGB datasets, not {config.data.name!r}.")
  examples = list(mocking.RandomFakeGenerator(features, NUM_EXAMPLES))

  def split(limit):
    kept = examples[:limit]
    return input_pipeline.Split(np.stack([e["image"] for e in kept]),
                                np.asarray([e["label"] for e in kept], np.int32))

  label = features["label"]
  return input_pipeline.Dataset(split(config.data.train_examples),
                                split(config.data.eval_examples),
                                label.num_classes, tuple(label.names))


def share_the_compilation_cache_between_processes():
  """Keys JAX's compilation cache by each device's id, process and kind, not by the topology.

  On CPU the topology's fingerprint differs from one process to the next, and only process 0
  writes cache entries, so every other process of a multi-process run compiled every program
  anew at each launch (the smoke train step alone ~12 s) while process 0, which read them from
  the cache, waited for it in the first collective. With this key they read process 0's
  entries: the same program for the same devices, as JAX's own
  `jax_share_binary_between_hosts` hands it over. The devices' processes stay in the key, so
  one process with two devices and two processes with one never share an entry.
  """
  try:  # A private hook of JAX 0.10: where a JAX lacks it, processes compile on their own.
    from jax._src import cache_key  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  if not hasattr(cache_key, "_hash_accelerator_config"):
    return

  def devices_and_processes(hash_obj, devices):
    for device in devices.flat:
      cache_key._hash_string(  # pylint: disable=protected-access
          hash_obj, f"{device.id}:{device.process_index}:{device.device_kind}")

  cache_key._hash_accelerator_config = devices_and_processes  # pylint: disable=protected-access


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  import run  # pylint: disable=g-import-not-at-top
  input_pipeline.load = mock_load
  share_the_compilation_cache_between_processes()
  app.run(run.main, flags_parser=run.config_lib.parse_flags)
