"""Where metrics go: TensorBoard event files, `metrics.jsonl`, and the console."""
import json
import logging as std_logging
import os

from absl import logging

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
  """Writes scalars to TensorBoard (as Keras' TensorBoard callback) and to JSON lines."""

  def __init__(self, workdir: str):
    from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
    self.writer = tensorboard.SummaryWriter(workdir)
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write(self, step: int, scalars: dict) -> None:
    for name, value in scalars.items():
      self.writer.scalar(name, value, step)
    self.writer.flush()
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    logging.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

  def close(self) -> None:
    self.writer.close()
    self.jsonl.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of `metrics.jsonl`; a resumed run's repeated steps keep their last value."""
  records = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      records.setdefault(record["step"], {}).update(record)
  return [records[s] for s in sorted(records)]
