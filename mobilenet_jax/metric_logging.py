"""Where metrics go: TensorBoard event files, `metrics.jsonl`, and the console."""
import json
import os

from absl import logging


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
    logging.warning("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

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
