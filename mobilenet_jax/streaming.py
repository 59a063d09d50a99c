"""Streamed input (`config.input.mode = "stream"`): each step's batch read and decoded on the host.

Every process reads only its own rows of each global batch (the rows its devices hold),
decodes them on `config.input.workers` threads, and puts them on its devices
`config.input.prefetch` steps ahead of the train step; `jax.make_array_from_process_local_data`
joins the processes' rows into the global batch. Which examples a step reads comes from the
same permutation as the device pipeline's (`sampler.py`, computed on the host CPU), and
host-side random draws from (seed, step, position in the global batch), so a run is the same
whatever the number of processes, and resumes at any step with nothing saved but the step.

Fixed-size images (a tfds split held in host memory) stream as stored: the train step
translates, flips and resizes them on device exactly as the device pipeline does, so
`stream` and `device` train the same model. Files of any size (`folders.py`) are fitted to
`image_size` on the host: for training the Inception-style random-resized crop and flip
with `config.augment.name = "inception"`, else as evaluation fits them (`images.py`).
"""
import concurrent.futures
import os
import queue
import threading

import jax
import numpy as np

from mobilenet_jax import images, input_pipeline, sampler

def _decode_pool(config):
  """config.input.workers threads (None: one per CPU core, at most 32): PIL decodes and
  resizes without holding the GIL."""
  return concurrent.futures.ThreadPoolExecutor(config.input.workers or
                                               min(32, os.cpu_count() or 1))


def process_rows(sharding, batch_size: int) -> slice:
  """The rows of a (batch_size, ...) array under `sharding` that this process's devices hold."""
  spans = {(s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
           for s in sharding.addressable_devices_indices_map((batch_size,)).values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError("The batch rows of this process's devices are not contiguous.")
  return slice(start, stop)


class _Prefetcher:
  """`make(item)` for each item, computed on a thread `depth` items ahead of the consumer."""
  _END = object()

  def __init__(self, make, items, depth: int):
    self._queue = queue.Queue(max(1, depth))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(make, items), daemon=True)
    self._thread.start()

  def _run(self, make, items):
    try:
      for item in items:
        if not self._put(make(item)):
          return
      self._put(self._END)
    except BaseException as e:  # pylint: disable=broad-except
      self._put(e)  # Raised in the consumer, where it has a traceback the run reports.

  def _put(self, value) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(value, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def __iter__(self):
    while (value := self._queue.get()) is not self._END:
      if isinstance(value, BaseException):
        raise value
      yield value

  def close(self):
    self._stop.set()
    self._thread.join()


class StreamFeed:
  """Batches read on the host for `runner` (a `parallel.JitRunner`); the train loop's feed."""

  def __init__(self, config, runner, train, test):
    self.config, self.runner, self.train_source, self.test_source = config, runner, train, test
    self.rows = process_rows(runner.batch_sharding, config.input.batch_size)
    self._pool = _decode_pool(config)
    self._permutation = (None, None)  # (epoch, its permutation), computed once per epoch.

  def close(self):
    self._pool.shutdown()

  def _epoch_permutation(self, epoch: int) -> np.ndarray:
    if self._permutation[0] != epoch:
      order = self.runner.sampler
      with jax.default_device(jax.local_devices(backend="cpu")[0]):
        perm = np.asarray(order.permutation(epoch * order.steps_per_epoch))
      self._permutation = (epoch, perm)
    return self._permutation[1]

  def _read(self, source, indices, transform):
    """Images `indices` of `source`: gathered as stored (fixed size), or decoded and
    `transform`ed (position in the batch, image) on the worker threads."""
    if source.fixed_size:
      return source.images[indices]
    return np.stack(list(self._pool.map(lambda j: transform(j, source.read(indices[j])),
                                        range(len(indices)))))

  def _put(self, batch: dict) -> dict:
    config, sharding = self.config, self.runner.batch_sharding
    return {k: jax.make_array_from_process_local_data(
        sharding, v, (config.input.batch_size, *v.shape[1:])) for k, v in batch.items()}

  def _train_batch(self, step: int) -> dict:
    config, spe = self.config, self.runner.steps_per_epoch
    first = (step % spe) * config.input.batch_size
    indices = self._epoch_permutation(step // spe)[first + self.rows.start:first + self.rows.stop]
    augment = lambda j, image: images.inception_crop(
        image, sampler.host_rng(config.seed, step, self.rows.start + j), config.input.image_size)
    transform = (augment if config.augment.name == "inception" else
                 lambda j, image: images.fit_to_input(image, config))
    return self._put({"image": self._read(self.train_source, indices, transform),
                      "label": self.train_source.labels[indices],
                      "index": indices.astype(np.int32)})

  def train_steps(self, state, start: int, stop: int):
    """Yields the train step's data arguments for steps [start, stop)."""
    del state  # The permutation comes from the step alone.
    prefetcher = _Prefetcher(self._train_batch, range(start, stop), self.config.input.prefetch)
    try:
      for batch in prefetcher:
        yield (batch,)
    finally:
      prefetcher.close()

  def _eval_batch(self, number: int):
    """Eval batch `number`: this process's rows, padded past the split's end and masked."""
    source, batch_size = self.test_source, self.config.input.batch_size
    positions = np.arange(self.rows.start, self.rows.stop) + number * batch_size
    real = positions < len(source)
    shape = (source.images.shape[1:] if source.fixed_size else
             (self.config.input.image_size, self.config.input.image_size, 3))
    pixels = np.zeros((len(positions), *shape), np.uint8)
    labels = np.zeros((len(positions),), np.int32)
    if real.any():
      pixels[real] = self._read(source, positions[real],
                                lambda j, image: images.fit_to_input(image, self.config))
      labels[real] = source.labels[positions[real]]
    return self._put({"image": pixels, "label": labels, "mask": real.astype(np.float32)})

  def evaluate(self, state, views):
    """Per-batch metric sums over the test split, each example counted once."""
    num_batches = -(-len(self.test_source) // self.config.input.batch_size)
    prefetcher = _Prefetcher(self._eval_batch, range(num_batches), self.config.input.prefetch)
    try:
      return [self.runner.evaluate_batch(state, b["image"], b["label"], b["mask"], views)
              for b in prefetcher]
    finally:
      prefetcher.close()


def image_bytes(source, config) -> int:
  """Bytes a split takes as uint8 in device memory (files: fitted to image_size)."""
  if source.fixed_size:
    return source.images.nbytes
  return len(source) * config.input.image_size ** 2 * 3


def read_all(source, config) -> input_pipeline.Split:
  """A split of files read whole into host memory, fitted to image_size (for `device`)."""
  with _decode_pool(config) as pool:
    fitted = list(pool.map(lambda i: images.fit_to_input(source.read(i), config),
                           range(len(source))))
  return input_pipeline.Split(np.stack(fitted), source.labels)
