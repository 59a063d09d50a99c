r"""Plots a run's learning curves from its `metrics.jsonl`: loss, accuracy, learning rate.

  python benchmarks/plot_curves.py --workdir=workdirs/quick --out=docs/quick_curves.png
"""
import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import matplotlib  # pylint: disable=g-import-not-at-top
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from mobilenet_jax import metric_logging  # pylint: disable=g-import-not-at-top


def plot(workdir: str, out: str, title: str | None = None) -> None:
  records = metric_logging.read_metrics(workdir)
  if not records:
    raise SystemExit(f"{workdir}/metrics.jsonl has no records: has the run finished an epoch?")
  epochs = [r["epoch"] for r in records]
  tested = [r for r in records if "test_accuracy" in r]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  panels = ((axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "accuracy"))
  for ax, key, label in panels:
    ax.plot(epochs, [r[f"train_{key}"] for r in records], label="train (augmented)")
    ax.plot([r["epoch"] for r in tested], [r[f"test_{key}"] for r in tested], label="test")
    ax.set_xlabel("epoch")
    ax.set_title(label)
    ax.grid(alpha=0.3)
    ax.legend()
  best = max(tested, key=lambda r: r["test_accuracy"]) if tested else None
  if best:
    axes[1].annotate(f"best test {best['test_accuracy']:.2%}",
                     (best["epoch"], best["test_accuracy"]), textcoords="offset points",
                     xytext=(-90, -15))
  # The rate in force during each epoch, drawn over that epoch's span (epoch e covers [e-1, e]).
  axes[2].stairs([r["learning_rate"] for r in records], [epochs[0] - 1] + epochs)
  axes[2].set_yscale("log")
  axes[2].set_xlabel("epoch")
  axes[2].set_title("learning rate")
  axes[2].grid(alpha=0.3)
  fig.suptitle(title or workdir)
  fig.tight_layout()
  fig.savefig(out, dpi=90)
  print(f"wrote {out}")


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True, help="PNG path")
  p.add_argument("--title")
  args = p.parse_args()
  plot(args.workdir, args.out, args.title)


if __name__ == "__main__":
  main()
