"""Where metrics go: TensorBoard event files, `metrics.jsonl`, and the console."""
import json
import logging as std_logging
import os
import socket
import time

from absl import logging

METRICS_FILE = "metrics.jsonl"  # In the workdir: one JSON record per log.
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run.py")


def _ours_or_a_warning(record) -> bool:
  return (record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE)
          or record.pathname == _RUN)


def show_progress() -> None:
  """The project's INFO lines on the console; other libraries' (orbax logs every save, JAX its
  backend search) only from WARNING up. absl's handler sees every logger's records."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_ours_or_a_warning)


class MetricLogger:
  """Writes scalars to a TensorBoard event file and to JSON lines.

  The event file is written with TensorBoard's record format and protos, not through
  TensorFlow as flax's and TensorBoard's own writers do (they open files with tf.io.gfile):
  importing TensorFlow costs a process ~5 s and ~0.5 GB, which a run that reads image folders
  never needs otherwise.
  """

  def __init__(self, workdir: str):
    # pylint: disable-next=g-import-not-at-top
    from tensorboard.summary.writer.record_writer import RecordWriter
    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self.events = RecordWriter(open(os.path.join(workdir, name), "wb"))
    self._write_event(file_version="brain.Event:2")
    self.jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")

  def _write_event(self, **fields) -> None:
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self.events.write(event_pb2.Event(wall_time=time.time(), **fields).SerializeToString())
    self.events.flush()

  def write(self, step: int, scalars: dict) -> None:
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    self._write_event(step=step, summary=summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=name, simple_value=float(value))
        for name, value in scalars.items()]))
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()  # The whole line in one write: a reader sees it whole or not at all.
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

  def close(self) -> None:
    self.events.close()
    self.jsonl.close()


def complete_records(text: str) -> list[dict]:
  """The rows of a metrics.jsonl's `text`, without a last line still being (or never fully)
  written: each row is one write of a whole line."""
  return [json.loads(line) for line in text.split("\n")[:-1]]


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl`; repeated steps (a resumed run's, in workdirs from before
  resumes trimmed the file) keep their last value."""
  records = {}
  with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
    for record in complete_records(f.read()):
      records.setdefault(record["step"], {}).update(record)
  return [records[s] for s in sorted(records)]
