"""Image folders as datasets (`config.data.name = "folder:PATH"`): one subfolder per class.

PATH holds either class subfolders directly or `train/` beside one of `test/`, `val/` or
`validation/`, each with the same class subfolders (ImageNet's layout); without an
evaluation folder a share of each class (`config.data.folder_holdout`) becomes the test split.
Class names are the subfolder names, sorted. Images are read lazily, one file per example,
so a folder larger than memory streams (`streaming.py`); the device pipeline reads it all once.
"""
import dataclasses
import os

import numpy as np

from mobilenet_jax import errors, images

PREFIX = "folder:"
EVAL_FOLDERS = ("test", "val", "validation")


class FolderError(errors.UserError, ValueError):
  """A folder dataset that cannot be used as one: run.py prints it as one line."""


@dataclasses.dataclass(frozen=True)
class FileSource:
  """A split as image files and int32 labels: `read(i)` decodes file i to RGB uint8."""
  paths: tuple[str, ...]
  labels: np.ndarray
  fixed_size = False  # Files differ in size: each is fitted to the model's input on the host.

  def __len__(self):
    return len(self.paths)

  def read(self, i: int) -> np.ndarray:
    try:
      return images.read(self.paths[i])
    except errors.FileError as e:
      raise FolderError(f"{e} Remove or replace the file and rerun: training resumes from its "
                        "last checkpoint.") from e


def is_folder(dataset: str) -> bool:
  return dataset.startswith(PREFIX)


def _root(config) -> str:
  return os.path.expanduser(config.data.name[len(PREFIX):])


def _classes(folder: str) -> list[str]:
  return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))


def _images(folder: str) -> list[str]:
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(images.EXTENSIONS))


def _listing(folder: str, classes: list[str]) -> FileSource:
  """The images of `folder`'s class subfolders (a class missing there has none)."""
  paths, labels = [], []
  for label, name in enumerate(classes):
    subfolder = os.path.join(folder, name)
    files = _images(subfolder) if os.path.isdir(subfolder) else []
    paths += files
    labels += [label] * len(files)
  return FileSource(tuple(paths), np.asarray(labels, np.int32))


def _holdout(split: FileSource, fraction: float, seed: int = 0):
  """Each class's files split into (train, test): a seeded shuffle, its first share held out,
  so the split is the same on every process and every run."""
  rng = np.random.default_rng(seed)
  test = np.zeros(len(split), bool)
  for label in np.unique(split.labels):
    members = np.flatnonzero(split.labels == label)
    held = max(1, round(fraction * len(members))) if len(members) > 1 else 0
    test[rng.permutation(members)[:held]] = True
  pick = lambda keep: FileSource(tuple(p for p, k in zip(split.paths, keep) if k),
                                 split.labels[keep])
  return pick(~test), pick(test)


def load(config):
  """(train, test, class names) of `config.data.name`'s folder, or a FolderError saying what
  is missing."""
  root = _root(config)
  hint = ("point --config.data.name=folder:PATH at a folder with one subfolder of images per "
          "class (or train/ and val/ folders of those); ImageNet's download and layout steps are "
          "in configs/imagenet.py")
  if not os.path.isdir(root):
    raise FolderError(f"config.data.name={config.data.name!r}: {root} is not a folder: {hint}.")
  evals = [d for d in EVAL_FOLDERS if os.path.isdir(os.path.join(root, d))]
  train_dir = os.path.join(root, "train")
  if not os.path.isdir(train_dir):
    train_dir = root
  classes = _classes(train_dir)
  if evals and train_dir != root:
    train = _listing(train_dir, classes)
    test = _listing(os.path.join(root, evals[0]), classes)
  else:
    if not 0 < config.data.folder_holdout < 1:
      raise FolderError(f"config.data.folder_holdout={config.data.folder_holdout}: {root} has no "
                        f"{'/'.join(EVAL_FOLDERS)} folder, so a share in (0, 1) of each class "
                        "is held out for evaluation (e.g. 0.1).")
    train, test = _holdout(_listing(train_dir, classes), config.data.folder_holdout)
  if len(classes) < 2:
    raise FolderError(f"config.data.name={config.data.name!r}: {len(classes)} class "
                      f"subfolder(s) in {root} ({', '.join(classes) or 'none'}); a classifier "
                      f"needs at least 2: {hint}.")
  for name, split in (("training", train), ("test", test)):
    if not len(split):
      raise FolderError(f"config.data.name={config.data.name!r}: no {name} images "
                        f"({', '.join(images.EXTENSIONS)}) in the class subfolders of {root}: "
                        f"{hint}.")
  return train, test, tuple(classes)
