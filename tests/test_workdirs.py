"""The workdir's owner: its lock (one run at a time, taken over from a gone holder) and files
that are only ever seen whole. The runs that hold the lock are in test_train.py."""
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from conftest import claim_lock
from mobilenet_jax import errors, metric_logging, workdirs


def _refused(workdir, *names):
  with pytest.raises(errors.WorkdirBusyError) as refusal:
    workdirs.Lock(str(workdir)).take()
  message = str(refusal.value)
  assert "\n" not in message and "--workdir" in message
  for name in names:
    assert name in message, message
  assert sorted(os.listdir(workdir)) == [workdirs.LOCK_FILE]  # Nothing written.


def _taken(workdir):
  lock = workdirs.Lock(str(workdir)).take()
  assert json.loads((workdir / workdirs.LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  assert not os.listdir(workdir)


def test_a_live_runs_lock_refuses_with_its_holder_and_a_killed_runs_is_taken_over(tmp_path):
  holder = subprocess.Popen(["sleep", "60"])
  try:
    claim_lock(tmp_path, socket.gethostname(), holder.pid)
    _refused(tmp_path, f"pid {holder.pid} on {socket.gethostname()}", "2026-12-04 08:00:00 UTC")
  finally:
    holder.kill()
    holder.wait()
  _taken(tmp_path)  # Its pid is gone: taken over at once.


def test_another_hosts_lock_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path):
  claim_lock(tmp_path, "node-that-died", 1, age_s=workdirs.STALE_AFTER_S - 30)
  _refused(tmp_path, "pid 1 on node-that-died")
  claim_lock(tmp_path, "node-that-died", 1, age_s=workdirs.STALE_AFTER_S + 30)
  _taken(tmp_path)
  # A container on this host (its own pids): a pid absent here says nothing; its heartbeat does.
  claim_lock(tmp_path, socket.gethostname(), 2**22 + 1, pids="pid:[1]")
  _refused(tmp_path, f"pid {2**22 + 1} on {socket.gethostname()}")


def _within(seconds, condition) -> bool:
  """Whether `condition()` holds within `seconds` (a loaded machine runs the thread late)."""
  deadline = time.time() + seconds
  while not condition():
    if time.time() > deadline:
      return False
    time.sleep(0.02)
  return True


def test_the_holder_beats_and_one_whose_lock_was_taken_over_stops_at_its_next_write(
    tmp_path, monkeypatch):
  monkeypatch.setattr(workdirs, "HEARTBEAT_S", 0.05)
  lock = workdirs.Lock(str(tmp_path)).take()
  path = tmp_path / workdirs.LOCK_FILE
  os.utime(path, (time.time() - 100,) * 2)
  assert _within(10, lambda: time.time() - path.stat().st_mtime < 50)  # Touched again.
  lock.check()
  claim_lock(tmp_path, "another-host", 7)  # Taken over while this run's heartbeat stalled.
  assert _within(10, lambda: lock.lost)
  with pytest.raises(errors.WorkdirBusyError, match="taken over by pid 7 on another-host"):
    lock.check()
  lock.release()
  assert json.loads(path.read_text())["pid"] == 7  # The new holder's lock stays.


def test_a_reader_never_sees_a_file_half_written(tmp_path):
  # Results of ~0.5 MB, rewritten while another thread reads: a file written in place would be
  # seen empty or cut short.
  versions = [{"version": v, "rows": list(range(50_000))} for v in range(2)]
  workdirs.write_results(str(tmp_path), versions[0])
  done, seen = threading.Event(), []

  def rewrite():
    for v in range(10):
      workdirs.write_results(str(tmp_path), versions[v % 2])
    done.set()

  writer = threading.Thread(target=rewrite)
  writer.start()
  while not done.is_set():
    seen.append(json.loads((tmp_path / workdirs.RESULTS_FILE).read_text())["version"])
  writer.join()
  assert len(seen) > 5 and set(seen) == {0, 1}
  assert os.listdir(tmp_path) == [workdirs.RESULTS_FILE]  # No temporary file left.


def test_a_write_that_fails_leaves_the_old_file_and_says_which_in_one_line(tmp_path,
                                                                            monkeypatch):
  workdirs.write_config(str(tmp_path), _Config('{"old": 1}'))

  def full_disk(*args):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(os, "fsync", full_disk)
  with pytest.raises(errors.WorkdirError) as failure:
    workdirs.write_config(str(tmp_path), _Config('{"new": 2}'))
  assert str(tmp_path / workdirs.CONFIG_FILE) in str(failure.value)
  assert "No space left on device" in str(failure.value) and "\n" not in str(failure.value)
  assert (tmp_path / workdirs.CONFIG_FILE).read_text() == '{"old": 1}'
  assert os.listdir(tmp_path) == [workdirs.CONFIG_FILE]


class _Config:
  def __init__(self, text):
    self.text = text

  def to_json_best_effort(self, indent):
    del indent
    return self.text


def test_a_resume_trims_metrics_to_its_step_and_drops_a_half_written_row(tmp_path):
  rows = [{"step": s, "train_loss": 1.0 / s} for s in (4, 8, 12)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 16, "train_lo'
  (tmp_path / workdirs.METRICS_FILE).write_text(text)
  assert metric_logging.read_metrics(str(tmp_path)) == rows  # A reader skips the cut row.
  workdirs.trim_metrics(str(tmp_path), 8)
  assert metric_logging.read_metrics(str(tmp_path)) == rows[:2]
  assert (tmp_path / workdirs.METRICS_FILE).read_text().endswith("\n")
