"""Multi-host: two processes with one CPU device each, on localhost with gloo collectives.

They must train exactly as one process with two devices, write the shared workdir
once, stop together when one dies, resume from the last checkpoint, and turn
mismatched configs and an absent coordinator into clear, bounded errors.
"""
import json
import os
import re
import signal
import socket
import subprocess
import time

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import claim_lock, latest_step, run_mocked, start_processes, wait_all, wait_for_checkpoint
from mobilenet_jax import checkpoints, multihost, workdirs

pytestmark = pytest.mark.slow  # Trains, or launches processes: `-m 'not slow'` skips it.

REFERENCE_EPOCHS = 12
STEPS_PER_EPOCH = 4  # 64 mock training examples in batches of 16.
# The well-conditioned network of test_parallel.py (the 16x16 smoke one amplifies rounding),
# with a weight average, which every comparison below includes.
COMMON = ["--config=configs/cifar.py:smoke", "--config.data.download=False",
          "--config.log.progress_bar=False", "--config.model.shallow=True",
          "--config.input.image_size=32", "--config.ema.decay=0.9", "--config.ema.num_updates=True",
          "--config.model.stem_stride=1", "--config.checkpoint.keep=100",
          "--config.distributed.heartbeat_timeout_s=10", "--config.distributed.timeout_s=30"]
# The most a run that should finish may take (~40 s here; a slow, loaded machine takes 3x).
RUN_S = 300
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
# pmap reduces the gradients in another order than jit: float32 rounding after 4 steps.
RTOL, ATOL = 1e-5, 1e-6
BOUND_S = 60  # A survivor or a misconfigured process must be gone within this.


def _start(workdir, *args, **kwargs):
  return start_processes(COMMON, workdir, *args, **kwargs)


def _state_at(workdir, step):
  """The TrainState (params, batch_stats, ema, ...) of the checkpoint at `step` in `workdir`."""
  from configs import cifar  # pylint: disable=g-import-not-at-top
  config = cifar.get_config("smoke")
  config.model.update(shallow=True, stem_stride=1)
  config.ema.decay = 0.9
  template = checkpoints.state_template(config)
  manager = checkpoints.Checkpointer(workdirs.checkpoint_dir(str(workdir)), 100).manager
  restored = manager.restore(step, args=ocp.args.StandardRestore(
      flax.serialization.to_state_dict(template)))
  manager.close()
  return flax.serialization.from_state_dict(template, restored)


def _assert_states_equal(a, b, **tolerance):
  assert a.ema is not None and b.ema is not None
  for name in ("params", "batch_stats", "ema"):
    for x, y in zip(jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))):
      if tolerance:
        np.testing.assert_allclose(x, y, err_msg=name, **tolerance)
      else:
        np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One process with two devices, every epoch's checkpoint and test metrics kept."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = run_mocked(*COMMON, f"--workdir={workdir}", f"--config.num_epochs={REFERENCE_EPOCHS}",
                      env=TWO_DEVICES)
  assert result.returncode == 0, result.stderr[-3000:]
  test_loss = {r["epoch"]: r["test_loss"] for r in
               map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}
  return workdir, test_loss


def _assert_one_epoch_as_the_reference(workdir, reference, parallel):
  """A finished 1-epoch run of two processes: the reference's state and test loss (exactly
  under jit; pmap reduces in another order), the shared files written once, by process 0."""
  ref_dir, ref_test_loss = reference
  tolerance = {} if parallel == "jit" else {"rtol": RTOL, "atol": ATOL}
  _assert_states_equal(_state_at(workdir, STEPS_PER_EPOCH), _state_at(ref_dir, STEPS_PER_EPOCH),
                       **tolerance)
  results = json.loads((workdir / "results.json").read_text())
  assert results["test_examples"] == 40
  np.testing.assert_allclose(results["test_loss"], ref_test_loss[1], rtol=RTOL if tolerance else 0)
  assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1
  assert len([f for f in os.listdir(workdir) if f.startswith("events.out.tfevents")]) == 1
  assert json.loads((workdir / "config.json").read_text())["parallel"] == parallel
  assert len(json.loads((workdir / "label_names.json").read_text())) == 10
  assert not [f for f in os.listdir(workdir) if f.startswith(".write_test")]
  assert sorted(os.listdir(workdir / "checkpoints")) == [str(STEPS_PER_EPOCH)]
  assert not (workdir / workdirs.LOCK_FILE).exists()


def test_two_processes_under_pmap_train_as_one_process_with_two_devices(reference, tmp_path):
  workdir = tmp_path / "run"
  codes, logs = wait_all(_start(workdir, "--config.num_epochs=1", "--config.parallel=pmap"),
                         timeout=RUN_S)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  _assert_one_epoch_as_the_reference(workdir, reference, "pmap")


def test_two_processes_train_as_one_then_a_preempted_and_killed_rerun_resumes_as_a_straight_run(
    reference, tmp_path):
  ref_dir, _ = reference
  workdir = tmp_path / "run"
  codes, logs = wait_all(_start(workdir, "--config.num_epochs=1"), timeout=RUN_S)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  _assert_one_epoch_as_the_reference(workdir, reference, "jit")

  # A longer rerun; a preemption notice (SIGTERM) reaches one host: both save the same step
  # and exit cleanly.
  runs = _start(workdir, "--config.num_epochs=1000")
  wait_for_checkpoint(runs, workdir, 2 * STEPS_PER_EPOCH)
  holder = json.loads((workdir / workdirs.LOCK_FILE).read_text())  # Process 0's, for both.
  assert holder["pid"] == runs[0][0].pid, holder
  runs[1][0].send_signal(signal.SIGTERM)
  codes, logs = wait_all(runs, timeout=BOUND_S)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert f"Resuming from the checkpoint at step {STEPS_PER_EPOCH}" in logs[0], logs[0][-3000:]
  saved = latest_step(workdir)
  for log in logs:
    assert f"SIGTERM: saved the checkpoint at step {saved}" in log, log[-3000:]

  # The rerun resumes there; then one process dies without notice: the other stops too.
  runs = _start(workdir, "--config.num_epochs=1000")
  wait_for_checkpoint(runs, workdir, (saved // STEPS_PER_EPOCH + 1) * STEPS_PER_EPOCH)
  runs[1][0].send_signal(signal.SIGKILL)
  killed_at = time.time()
  codes, logs = wait_all(runs, timeout=BOUND_S)
  assert f"Resuming from the checkpoint at step {saved}" in logs[0], logs[0][-3000:]
  assert codes[0] not in (0, "timeout"), logs[0][-3000:]
  assert time.time() - killed_at < BOUND_S
  # Said once, in one line: which kind of failure, what to do.
  lost = [line for line in logs[0].splitlines() if line.startswith("Process 0 of 2 ")]
  assert len(lost) == 1 and "Error dispatching" not in lost[0], logs[0][-3000:]
  assert re.match(r"Process 0 of 2 lost another process: a collective failed \(.*(reset|closed)"
                  r".*Rerun all processes", lost[0]), lost[0]

  # Rerun once more to the end of the epoch after the last checkpoint: as if never stopped.
  last = latest_step(workdir)
  epochs = last // STEPS_PER_EPOCH + 1
  assert 2 <= epochs <= REFERENCE_EPOCHS, last
  codes, logs = wait_all(_start(workdir, f"--config.num_epochs={epochs}"), timeout=RUN_S)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert f"Resuming from the checkpoint at step {last}" in logs[0]
  _assert_states_equal(_state_at(workdir, epochs * STEPS_PER_EPOCH),
                       _state_at(ref_dir, epochs * STEPS_PER_EPOCH))


@pytest.mark.parametrize("per_process, message", [
    ([["--config.input.batch_size=16"], ["--config.input.batch_size=8"]],
     r"config differs from process \d's in 1 field\(s\): config.input.batch_size="),
    ([["--config.input.batch_size=15"], ["--config.input.batch_size=15"]],
     "must be a positive multiple of the 2 devices of 2 processes"),
])
def test_processes_that_cannot_run_together_both_stop_with_the_reason(tmp_path, per_process,
                                                                      message):
  workdir = tmp_path / "run"
  start = time.time()
  codes, logs = wait_all(_start(workdir, per_process=per_process), timeout=BOUND_S)
  assert time.time() - start < BOUND_S
  for code, log in zip(codes, logs):
    assert code not in (0, "timeout"), log[-3000:]
    assert re.search(message, log), log[-3000:]


def test_a_held_workdir_stops_every_process_naming_the_holder_and_nothing_is_written(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen(["sleep", "120"])
  claim_lock(workdir, socket.gethostname(), holder.pid)
  try:
    codes, logs = wait_all(_start(workdir), timeout=BOUND_S)
  finally:
    holder.kill()
    holder.wait()
  for code, log in zip(codes, logs):
    assert code not in (0, "timeout"), log[-3000:]
    assert f"is in use by another run: pid {holder.pid} on {socket.gethostname()}" in log, log
  assert os.listdir(workdir) == [workdirs.LOCK_FILE]


def test_an_unreachable_coordinator_is_an_error_within_the_timeout(tmp_path):
  start = time.time()
  codes, logs = wait_all(_start(tmp_path / "run", "--config.distributed.timeout_s=5",
                             process_ids=[1]), timeout=BOUND_S)
  assert codes[0] not in (0, "timeout") and time.time() - start < BOUND_S
  assert "did not answer within config.distributed.timeout_s=5" in logs[0], (
      logs[0][-3000:])


def test_xlas_repeated_dispatch_prefixes_are_said_once():
  error = RuntimeError("UNKNOWN: " + "Error dispatching computation: " * 12 + "Gloo all-reduce "
                       "failed: [pair.cc:538] Read error [10.0.0.7]:58798: Connection reset by "
                       "peer\n(the rest)")
  assert multihost.first_line(error) == (
      "RuntimeError: UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error "
      "[10.0.0.7]:58798: Connection reset by peer")
