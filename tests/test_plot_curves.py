"""The learning-curve plot reads metrics.jsonl (keeping a resumed step's last record) into a PNG."""
import json

import pytest

from benchmarks import plot_curves


def test_plot_writes_a_png(tmp_path):
  records = [{"step": 10 * e, "epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.2 * e,
              "learning_rate": 0.1 if e < 3 else 0.01, "test_loss": 2.1 / e,
              "test_accuracy": 0.19 * e} for e in range(1, 5)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  out = tmp_path / "curves.png"
  plot_curves.plot(str(tmp_path), str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_an_empty_run_says_why(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("")
  with pytest.raises(SystemExit, match="has no records"):
    plot_curves.plot(str(tmp_path), str(tmp_path / "x.png"))
