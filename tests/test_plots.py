"""A run's figures: the curves from metrics.jsonl, the confusion matrix from results.json."""
import json

import numpy as np
from PIL import Image
import pytest

from mobilenet_jax import errors, plots, workdirs

_NAMES = ["airplane", "automobile", "bird"]


def _png(path) -> tuple[int, int]:
  with Image.open(path) as image:
    assert image.format == "PNG"
    image.load()  # Decodes it whole: a truncated file fails here.
    return image.size


def test_curves_and_the_confusion_matrix_are_drawn_from_the_workdirs_files(tmp_path):
  records = [{"step": 10 * e, "epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.2 * e,
              "learning_rate": 0.1 if e < 3 else 0.01, "test_loss": 2.1 / e,
              "test_accuracy": 0.19 * e, "ema_test_loss": 2.2 / e, "ema_test_accuracy": 0.18 * e}
             for e in range(1, 5)]
  (tmp_path / workdirs.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
  confusion = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
  (tmp_path / workdirs.RESULTS_FILE).write_text(json.dumps(
      {"test_accuracy": 0.75, "test_examples": 16, "test_confusion": confusion.tolist()}))
  (tmp_path / workdirs.LABELS_FILE).write_text(json.dumps(_NAMES))
  assert _png(plots.curves(str(tmp_path))) == _png(tmp_path / plots.CURVES_FILE)
  width, height = _png(plots.confusion(str(tmp_path)))
  assert width > height > 300


def test_a_workdir_without_its_files_says_which_is_missing(tmp_path):
  (tmp_path / workdirs.METRICS_FILE).write_text("")
  with pytest.raises(errors.WorkdirError, match="has no records"):
    plots.curves(str(tmp_path))
  with pytest.raises(errors.WorkdirError, match="results.json does not exist"):
    plots.confusion(str(tmp_path))


@pytest.mark.slow
def test_a_run_leaves_both_figures_in_its_workdir(trained_workdir):
  for name in (plots.CURVES_FILE, plots.CONFUSION_FILE):
    width, height = _png(trained_workdir / name)
    assert width > 300 and height > 300
