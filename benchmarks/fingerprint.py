r"""A fingerprint of every preset's training, to hold a refactor to the same runs bit for bit.

  .venv/bin/python benchmarks/fingerprint.py --out=/tmp/after.json [--compare=/tmp/before.json]

Each case trains a preset for 2 epochs on the first 256 CIFAR-10 training images (40 test
images; ImageNet's recipe on generated image folders), on 2 CPU devices, then records hashes of
the final params, BatchNorm statistics and optimizer state, the metrics.jsonl rows and
results.json (timings left out). Run it at two commits and compare: `SAME` means the two train
the same model. The ImageNet layouts run at 64 pixels and alpha 0.25 to stay within minutes
(about 6 on 2 cores); every other field is the preset's. Needs the prepared CIFAR-10 in
`--data_dir`.
"""
import argparse
import hashlib
import importlib
import json
import os
import pathlib
import shutil
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from mobilenet_jax import train, workdirs  # pylint: disable=g-import-not-at-top

SMALL = {"data.train_examples": 256, "data.eval_examples": 40, "num_epochs": 2,
         "data.download": False, "log.progress_bar": False}
IMAGENET_SMALL = {"input.image_size": 64, "model.alpha": 0.25, "data.eval_examples": 24}
CASES = {  # name: (config module, preset, overrides)
    "cifar": ("cifar", "", {}),
    "cifar_torch": ("cifar", "torch", {}),
    "cifar_quick": ("cifar", "quick", {}),
    "smoke_pmap_everything": ("cifar", "smoke", {
        "augment.cutout": 8, "augment.alternate_flips": True, "eval.flip": True, "eval.shift": 2,
        "parallel": "pmap", "model.dropout": 0.2, "augment.label_smoothing": 0.1}),
    "smoke_jit_dropout": ("cifar", "smoke", {"augment.cutout": 6, "eval.flip": True,
                                             "model.dropout": 0.2}),
    "smoke_stream": ("cifar", "smoke", {"input.mode": "stream", "augment.cutout": 4}),
    "keras_cifar10": ("imagenet", "keras,cifar10", IMAGENET_SMALL),
    "timm_cifar10": ("imagenet", "timm,cifar10", IMAGENET_SMALL),
    "imagenet_train": ("imagenet", "train", {
        "input.image_size": 64, "model.alpha": 0.25, "model.num_classes": 3,
        "input.per_process_batch_size": 8, "data.train_examples": None,
        "data.eval_examples": None}),
}


def _folder(root: pathlib.Path) -> str:
  """3 classes of 24 PNGs of 40-89 pixels a side (the same files on every call)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not root.exists():
    rng = np.random.default_rng(0)
    for c in range(3):
      (root / f"c{c}").mkdir(parents=True)
      for i in range(24):
        h, w = rng.integers(40, 90, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(root / f"c{c}/{i}.png")
  return f"folder:{root}"


def _digest(tree) -> str:
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()[:16]


def fingerprint(name: str, data_dir: str, scratch: pathlib.Path) -> dict:
  module, preset, overrides = CASES[name]
  config = importlib.import_module(f"configs.{module}").get_config(preset)
  config.update_from_flattened_dict({**SMALL, "data.dir": data_dir, **overrides})
  if name == "imagenet_train":
    config.data.name = _folder(scratch / "folder")
  workdir = scratch / name
  shutil.rmtree(workdir, ignore_errors=True)
  results = train.train_and_evaluate(config, str(workdir))
  state = workdirs.restore_trained(str(workdir), workdirs.load_config(str(workdir)))
  timeless = lambda d: {k: v for k, v in d.items() if "per_s" not in k and k != "wall_s"}
  with open(workdir / workdirs.METRICS_FILE, encoding="utf-8") as f:
    rows = [timeless(json.loads(line)) for line in f]
  return {"step": int(state.step), "params": _digest(state.params),
          "batch_stats": _digest(state.batch_stats), "opt_state": _digest(state.opt_state),
          "metrics": rows, "results": timeless(results)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="Where to write the fingerprints (JSON).")
  parser.add_argument("--compare", help="Fingerprints of another commit, to compare with.")
  parser.add_argument("--data_dir", default=os.environ.get("TFDS_DATA_DIR",
                                                           "../shared/tensorflow_datasets"))
  parser.add_argument("--scratch", default="/tmp/mobilenet_fingerprint")
  parser.add_argument("cases", nargs="*", default=list(CASES))
  args = parser.parse_args()
  prints = {name: fingerprint(name, os.path.abspath(args.data_dir), pathlib.Path(args.scratch))
            for name in args.cases}
  pathlib.Path(args.out).write_text(json.dumps(prints, indent=1))
  other = json.loads(pathlib.Path(args.compare).read_text()) if args.compare else {}
  header = ["case", "params hash", "test accuracy"] + (["same as --compare"] if other else [])
  rows = [[name, p["params"], f"{p['results']['test_accuracy']:.4f}"] +
          ([str(other.get(name) == p)] if other else []) for name, p in prints.items()]
  for row in [header, ["---"] * len(header), *rows]:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main()
