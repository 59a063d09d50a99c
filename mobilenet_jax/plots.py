r"""A run's figures, drawn into its workdir at the end of training (and by hand for any workdir):

  curves.png     loss, accuracy and learning rate per epoch, from metrics.jsonl;
  confusion.png  the final evaluation's confusion matrix (results.json) with the class names
                 (label_names.json): of the weight average when the run kept one (config.ema),
                 as predict and export use it.

  python -m mobilenet_jax.plots --workdir=workdirs/quick
"""
import io
import json
import os
import sys

from absl import app, flags
import numpy as np

from mobilenet_jax import errors, metric_logging, workdirs

CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"
# Up to this many classes the matrix is annotated with its counts and labelled with the names.
ANNOTATED_CLASSES = 20
NAMED_CLASSES = 60


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(plt, fig, workdir: str, name: str) -> str:
  """The figure as a PNG in `workdir`, written whole or not at all."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=90)
  plt.close(fig)
  workdirs.write_file(workdir, name, buffer.getvalue())
  return os.path.join(workdir, name)


def curves(workdir: str, title: str | None = None) -> str:
  """Draws WORKDIR/curves.png from metrics.jsonl; returns its path."""
  records = metric_logging.read_metrics(workdir)
  if not records:
    raise errors.WorkdirError(f"{workdir}/metrics.jsonl has no records: plot once the run has "
                              "finished an epoch.")
  plt = _pyplot()
  epoch_rows = [r for r in records if "epoch" in r]  # Not log.every_steps' rows.
  epochs = [r["epoch"] for r in epoch_rows]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for ax, key, label in ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy",
                                                                     "accuracy")):
    ax.plot(epochs, [r[f"train_{key}"] for r in epoch_rows], label="train (augmented)")
    for prefix, name in (("test", "test"), ("ema_test", "test, weight average")):
      tested = [r for r in epoch_rows if f"{prefix}_{key}" in r]
      if tested:
        ax.plot([r["epoch"] for r in tested], [r[f"{prefix}_{key}"] for r in tested], label=name)
    ax.set_xlabel("epoch")
    ax.set_title(label)
    ax.grid(alpha=0.3)
    ax.legend()
  tested = [r for r in epoch_rows if "test_accuracy" in r]
  if tested:
    best = max(tested, key=lambda r: r["test_accuracy"])
    axes[1].annotate(f"best test {best['test_accuracy']:.2%}",
                     (best["epoch"], best["test_accuracy"]), textcoords="offset points",
                     xytext=(-90, -15))
  # The rate in force during each epoch, drawn over that epoch's span (epoch e covers [e-1, e]).
  axes[2].stairs([r["learning_rate"] for r in epoch_rows], [epochs[0] - 1] + epochs)
  axes[2].set_yscale("log")
  axes[2].set_xlabel("epoch")
  axes[2].set_title("learning rate")
  axes[2].grid(alpha=0.3)
  fig.suptitle(title or os.path.abspath(workdir))
  fig.tight_layout()
  return _save(plt, fig, workdir, CURVES_FILE)


def confusion(workdir: str) -> str:
  """Draws WORKDIR/confusion.png from results.json and label_names.json; returns its path.

  Each row is a true class, coloured by the share of its examples predicted as each class (so
  rare classes show as clearly as common ones), annotated with the counts.
  """
  results = _read_json(workdir, workdirs.RESULTS_FILE)
  prefix = "ema_" if "ema_test_confusion" in results else ""
  matrix = np.asarray(results[f"{prefix}test_confusion"])
  names = _read_json(workdir, workdirs.LABELS_FILE)
  n = len(matrix)
  shares = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
  plt = _pyplot()
  side = min(4 + 0.45 * n, 14)
  fig, ax = plt.subplots(figsize=(side + 1.5, side))
  image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
  if n <= NAMED_CLASSES:
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
  if n <= ANNOTATED_CLASSES:
    for (i, j), count in np.ndenumerate(matrix):
      ax.text(j, i, str(int(count)), ha="center", va="center", fontsize=7,
              color="white" if shares[i, j] > 0.5 else "black")
  ax.set_xlabel("predicted class")
  ax.set_ylabel("true class")
  weights = "weight average" if prefix else "weights"
  ax.set_title(f"{weights}: test accuracy {results[f'{prefix}test_accuracy']:.2%} on "
               f"{results['test_examples']} examples")
  fig.tight_layout()
  return _save(plt, fig, workdir, CONFUSION_FILE)


def _read_json(workdir: str, name: str):
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise errors.WorkdirError(f"{path} does not exist: plot a workdir whose run has finished.")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def main(argv):
  del argv
  try:
    for path in (curves(flags.FLAGS.workdir), confusion(flags.FLAGS.workdir)):
      print(f"wrote {path}")
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A workdir trained by run.py.", required=True)
  app.run(main)
