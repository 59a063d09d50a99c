"""Data-parallel execution: `jax.jit` over a 1-D device mesh (default) or `jax.pmap`.

Both runners compile the same pure `steps.train_step`, wrapped with the sampler's
on-device batch gather (`sampler.py`), and expose the same operations (put/get state
and data, shuffle, train, evaluate, fetch metrics), so the training loop does not
know which one it drives. Datasets are replicated on every device (CIFAR is 150 MB as uint8); each
step gathers the global batch from the epoch's permutation, sharded along the
batch axis. `DeviceFeed` is that input as the training loop takes it; with streamed input
(`streaming.StreamFeed`, jit only) each step's batch arrives from the host instead.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mobilenet_jax import errors, input_pipeline, steps
from mobilenet_jax import sampler as sampler_lib

PARALLEL_MODES = ("jit", "pmap")
AXIS = "data"


class _Runner:
  """Shared logic: the sampler, and the evaluation scan over the eval batches."""

  def __init__(self, config, num_train: int):
    self.config = config
    self.num_devices = jax.device_count()
    self.sampler = sampler_lib.Sampler(config, num_train)

  @property
  def steps_per_epoch(self) -> int:
    return self.sampler.steps_per_epoch

  def _evaluate(self, state, images, labels, mask, views):
    """Metric sums over the eval batches, on the test-time `views` (`inference.Views`)."""
    def sums(batch):
      return steps.eval_step(state, *batch, self.config, views)
    def body(total, batch):
      return jax.tree.map(jnp.add, total, sums(batch)), None
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(sums, (images[0], labels[0], mask[0])))
    return jax.lax.scan(body, zeros, (images, labels, mask))[0]


class JitRunner(_Runner):
  """`jax.jit` with the batch sharded over a ('data',) mesh and everything else replicated."""
  axis_name = None

  def __init__(self, config, num_train: int, streamed: bool = False):
    super().__init__(config, num_train)
    self.mesh = Mesh(np.asarray(jax.devices()), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

    def step(state, batch):
      batch = jax.lax.with_sharding_constraint(batch, self.batch_sharding)
      return steps.train_step(state, batch, self.sampler.step_key(state.step), config)

    def gathered(state, data, perm):
      return step(state, self.sampler.batch(state.step, data, perm))

    def streamed_step(state, batch):  # 'image', 'label' and 'index' (the examples') from the host.
      return step(state, {**batch, **self.sampler.draws(state.step, batch["index"])})

    self.train = jax.jit(streamed_step if streamed else gathered, donate_argnums=0)
    self.shuffle = jax.jit(lambda state: self.sampler.permutation(state.step))
    self.evaluate = jax.jit(self._evaluate, static_argnames="views")
    self.evaluate_batch = jax.jit(
        lambda state, images, labels, mask, views: steps.eval_step(
            state, images, labels, mask, config, views), static_argnames="views")

  def _put(self, x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  def put_state(self, state):
    return jax.tree.map(lambda x: self._put(x, self.replicated), state)

  def get_state(self, state):
    return jax.device_get(state)

  def put_train_data(self, split):
    return {"image": self._put(split.images, self.replicated),
            "label": self._put(split.labels, self.replicated)}

  def put_eval_data(self, split):
    sharding = NamedSharding(self.mesh, P(None, AXIS))
    return tuple(self._put(a, sharding)
                 for a in input_pipeline.eval_batches(split, self.config.input.batch_size))

  def metrics(self, metrics):
    return jax.device_get(metrics)


class PmapRunner(_Runner):
  """`jax.pmap` over all devices: state and data replicated, each device takes its batch slice."""
  axis_name = AXIS

  def __init__(self, config, num_train: int, streamed: bool = False):
    if streamed:
      raise errors.ConfigError(
          "config.input.mode='stream' runs under jit: pass --config.parallel=jit (or "
          "--config.input.mode=device).")
    super().__init__(config, num_train)
    local = config.input.batch_size // self.num_devices
    self.devices = jax.local_devices()

    def train(state, data, perm):
      batch = self.sampler.batch(state.step, data, perm, jax.lax.axis_index(AXIS) * local, local)
      return steps.train_step(state, batch, self.sampler.step_key(state.step), config,
                              axis_name=AXIS)

    def evaluate(state, images, labels, mask, views):
      shard = lambda a: jax.lax.dynamic_slice_in_dim(a, jax.lax.axis_index(AXIS) * local, local, 1)
      return jax.lax.psum(
          self._evaluate(state, shard(images), shard(labels), shard(mask), views), AXIS)

    self.train = jax.pmap(train, axis_name=AXIS, donate_argnums=0)
    self.shuffle = jax.pmap(lambda state: self.sampler.permutation(state.step), axis_name=AXIS)
    evaluate = jax.pmap(evaluate, axis_name=AXIS, static_broadcasted_argnums=4)
    self.evaluate = lambda state, images, labels, mask, views: evaluate(
        state, images, labels, mask, views)

  def _replicate(self, tree):
    """A copy per device, stacked along a leading device axis, as pmap takes its inputs."""
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("devices",)), P("devices"))
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_single_device_arrays(
          (self.num_devices, *x.shape), sharding,
          [jax.device_put(x[None], d) for d in self.devices])
    return jax.tree.map(put, tree)

  def put_state(self, state):
    return self._replicate(state)

  @staticmethod
  def _first(tree):
    """Device 0's copy, fetched alone (indexing on device would be a host-to-device transfer)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:]),
                        tree)

  def get_state(self, state):
    return self._first(state)

  def put_train_data(self, split):
    return self._replicate({"image": split.images, "label": split.labels})

  def put_eval_data(self, split):
    return self._replicate(input_pipeline.eval_batches(split, self.config.input.batch_size))

  def metrics(self, metrics):
    return self._first(metrics)


def check_config(config) -> None:
  if config.parallel not in PARALLEL_MODES:
    raise errors.ConfigError(
        f"config.parallel={config.parallel!r}: expected one of {PARALLEL_MODES}.")


def create_runner(config, num_train: int, streamed: bool = False):
  """The runner of config.parallel; `streamed`: its train step takes batches from the host."""
  return (JitRunner if config.parallel == "jit" else PmapRunner)(config, num_train, streamed)


class DeviceFeed:
  """The dataset held on the devices: each step gathers its batch there (the default input)."""

  def __init__(self, runner, data):
    self.runner = runner
    self.train_data = runner.put_train_data(data.train)
    self.eval_data = runner.put_eval_data(data.test)

  def train_steps(self, state, start: int, stop: int):
    """Yields the train step's data arguments for steps [start, stop) of one epoch."""
    permutation = self.runner.shuffle(state)
    for _ in range(start, stop):
      yield self.train_data, permutation

  def evaluate(self, state, views):
    return self.runner.evaluate(state, *self.eval_data, views)

  def close(self):
    pass
