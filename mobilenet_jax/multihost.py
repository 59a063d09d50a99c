"""Several processes (one per host) training as one: connecting, agreeing, stopping together.

Every process runs the same command with the same config and the same shared
`--workdir`; JAX joins their devices into one global mesh, so the run is the
same program as one process with all the devices. Three things make that safe:

- `initialize` connects the processes within `config.distributed.timeout_s`
  (an unreachable coordinator is an error, not a hang) and sets JAX's heartbeat
  to `config.distributed.heartbeat_timeout_s`: a process that stops answering for that long
  is declared dead and the others are terminated.
- `check_same_config` compares every process's config with process 0's before
  anything is compiled: processes that disagree (a different batch size, say)
  would otherwise run different programs and hang in their first collective.
- `exit_after_failure` ends a process that failed within `EXIT_BARRIER_MS`,
  skipping JAX's shutdown barrier: that barrier waits for every peer (up to 5
  minutes), and after a failure they may never come. Its peers then fail in their
  next collective ("connection closed by peer") and exit the same way, so all
  stop within seconds of one another; a peer that hangs instead is ended by the
  heartbeat.
"""
import json
import os
import re
import socket
import sys
import time
import traceback

from absl import logging
import jax

from mobilenet_jax import errors

# Fields that say which process this is; every other field must agree across processes.
IDENTITY_FIELDS = tuple(f"distributed.{name}" for name in (
    "coordinator_address", "num_processes", "process_id"))
_CONFIG_KEY = "mobilenet_jax/config/{}"
EXIT_BARRIER_MS = 10_000  # How long a failed process waits for its peers to fail too.


# XLA prefixes a failure once for every queued computation that it reached (a dozen steps).
_DISPATCH = re.compile(r"(Error dispatching computation: )+")
# A collective that lost its peer: gloo (CPU) and NCCL (GPU) report the broken connection.
_LOST_PEER = re.compile(r"(gloo|nccl).*(connection|closed|reset|peer|socket)", re.IGNORECASE)


def first_line(error: BaseException) -> str:
  """'Type: first line of the message', for one-line reports of long (XLA, orbax) errors."""
  text = _DISPATCH.sub("", str(error).strip())
  return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def initialize(config) -> None:
  """`jax.distributed.initialize` with `config.distributed`'s coordinator and timeouts (no-op
  unless enabled).

  Unset coordinator fields are left to JAX: `$JAX_COORDINATOR_ADDRESS`, then
  its cluster detection (SLURM, Open MPI, Cloud TPU, Kubernetes).
  """
  hosts = config.distributed
  if not hosts.enabled:
    return
  address = hosts.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  # JAX aborts the process (no exception) when it cannot connect in time: say first what it tries.
  logging.info("Joining the other processes through the coordinator at %s (within "
               "config.distributed.timeout_s=%s).", address or "(detected by JAX)",
               hosts.timeout_s)
  if address and hosts.process_id:  # Process 0 starts the coordinator; the others need it up.
    _wait_for_coordinator(address, hosts.timeout_s)
  try:
    jax.distributed.initialize(
        coordinator_address=hosts.coordinator_address, num_processes=hosts.num_processes,
        process_id=hosts.process_id, initialization_timeout=hosts.timeout_s,
        heartbeat_timeout_seconds=hosts.heartbeat_timeout_s)
  except (ValueError, TypeError, RuntimeError) as e:
    raise ConnectionError(
        f"config.distributed.enabled=True: could not join the other processes within "
        f"config.distributed.timeout_s={hosts.timeout_s} ({first_line(e)}). Start all processes "
        "with the same command, and check config.distributed.coordinator_address (host:port of "
        "process 0, or $JAX_COORDINATOR_ADDRESS), config.distributed.num_processes and "
        "config.distributed.process_id, or run inside SLURM, Open MPI, Kubernetes or a Cloud "
        "TPU VM, where JAX detects them.") from e
  logging.info("Process %d of %d, %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Returns once `address` ('host:port') accepts connections; raises after `timeout_s`."""
  host, port = address.rsplit(":", 1)
  deadline = time.time() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
        return
    except OSError as e:
      if time.time() > deadline:
        raise ConnectionError(
            f"config.distributed.enabled=True: the coordinator at {address} "
            "(config.distributed.coordinator_address or $JAX_COORDINATOR_ADDRESS) did not answer "
            f"within config.distributed.timeout_s={timeout_s} ({e.strerror or e}). Start process "
            "0 (config.distributed.process_id=0) on that host with the same command, and check "
            "the host name and port.") from e
      time.sleep(0.5)


def _comparable(config) -> dict:
  """The config as flat 'a.b' -> JSON value pairs, without the fields that name the process."""
  def flatten(node, prefix=""):
    for key, value in node.items():
      if isinstance(value, dict):
        yield from flatten(value, f"{prefix}{key}.")
      elif f"{prefix}{key}" not in IDENTITY_FIELDS:
        yield f"{prefix}{key}", value
  return dict(flatten(json.loads(config.to_json_best_effort())))


def _client():
  """JAX's client of the coordinator, or None where this JAX keeps it elsewhere.

  Its key-value store and barriers have no public API: this is the project's one use of a
  private JAX name (orbax reaches the client the same way). Without it, the config check and
  the exit barrier are skipped, with a warning: the run itself needs neither.
  """
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.client
  except (ImportError, AttributeError):
    logging.warning("jax %s keeps its distributed client elsewhere: processes' configs are "
                    "not compared before compiling (a mismatch hangs the first step).",
                    jax.__version__)
    return None


def check_same_config(config) -> None:
  """Raises, on every process, if any process's config differs from process 0's.

  Goes through the coordinator's key-value store, not a collective, so that it
  runs before anything is compiled and each wait is bounded by
  `config.distributed.timeout_s`.
  """
  if jax.process_count() == 1:
    return
  client = _client()
  if client is None:
    return
  me = jax.process_index()
  mine = _comparable(config)
  client.key_value_set(_CONFIG_KEY.format(me), json.dumps(mine))
  others = range(1, jax.process_count()) if me == 0 else [0]
  timeout_ms = int(config.distributed.timeout_s * 1000)
  mismatches = []
  for other in others:
    theirs = json.loads(client.blocking_key_value_get(_CONFIG_KEY.format(other), timeout_ms))
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if differ:
      mismatches.append((other, theirs, differ))
  # Nobody leaves before all have read what they need: an exit would close the coordinator.
  client.wait_at_barrier("mobilenet_jax/config_checked", timeout_ms)
  if mismatches:
    other, theirs, differ = mismatches[0]
    shown = ", ".join(f"config.{k}={mine.get(k)!r} here, {theirs.get(k)!r} there"
                      for k in differ[:3])
    raise errors.ConfigError(
        f"Process {me}'s config differs from process {other}'s in {len(differ)} field(s): "
        f"{shown}. Start every process with the same command; only "
        f"{', '.join('config.' + f for f in IDENTITY_FIELDS)} may differ.")


def on_process_0(fn, what: str, timeout_s: float):
  """`fn()` on process 0 alone (e.g. taking the workdir's lock); on the others None. A UserError
  it raises is raised on every process, with its message: all stop together, before compiling."""
  if jax.process_count() == 1:
    return fn()
  client, key = _client(), f"mobilenet_jax/{what}"
  if jax.process_index() == 0:
    try:
      result = fn()
    except errors.UserError as e:
      if client:
        client.key_value_set(key, str(e) or type(e).__name__)
      raise
    if client:
      client.key_value_set(key, "")
    return result
  if client:
    failure = client.blocking_key_value_get(key, int(1000 * timeout_s))
    if failure:
      raise errors.UserError(f"process 0 failed ({what}): {failure}")
  return None


def exit_after_failure(error: BaseException, checkpoint_dir: str) -> None:
  """Says once why this process stops and ends it with status 1 (see the module docstring).

  A lost peer and a user's error are one line; anything else (a bug) keeps its traceback.
  """
  me = f"Process {jax.process_index()} of {jax.process_count()}"
  rerun = ("Rerun all processes with the same command: they resume from the last checkpoint "
           f"in {checkpoint_dir}.")
  if _LOST_PEER.search(str(error)):
    print(f"{me} lost another process: a collective failed ({first_line(error).rstrip('.')}); "
          "that process stopped or its host went down, and its own log says why. " + rerun,
          file=sys.stderr, flush=True)
  else:
    if not isinstance(error, errors.UserError):
      traceback.print_exception(error, file=sys.stderr)
    print(f"{me} stopped: {first_line(error).rstrip('.')}. If another process failed first, "
          "this one followed it. " + rerun, file=sys.stderr, flush=True)
  sys.stdout.flush()
  logging.flush()
  # Peers that fail with this one (a config error all of them find) need a moment to report it:
  # once process 0 exits, the coordinator is gone and JAX aborts the others mid-sentence.
  try:
    _client().wait_at_barrier("mobilenet_jax/exit", EXIT_BARRIER_MS)
  except Exception:  # pylint: disable=broad-except
    pass  # A peer that died or hangs does not come; the barrier's end is the bound.
  os._exit(1)  # pylint: disable=protected-access
