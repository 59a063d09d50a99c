r"""Datasets of arrays (`config.data.name = "npz:PATH"`), and the command that writes them.

The arrays are those `keras.datasets.cifar10.load_data()` returns: `x_train` and `x_test`,
uint8 images (n, h, w, 3) (or grayscale (n, h, w) / (n, h, w, 1), read as RGB), `y_train` and
`y_test`, integer labels (n,) or (n, 1); optionally `label_names`, one string per class (else
`config.data.class_names`, else the label numbers). PATH is one `.npz` file holding all of them,
or a folder of chunk files `NAME-00000-of-00003.npz` ...: each holds consecutive rows of the
training split, then of the test split, under the same keys, and the reader concatenates them in
name order, after checking that every chunk is there.

Reading needs numpy alone (no TensorFlow, no tfds), which is what a machine with an
accelerator and little else needs; writing reads any dataset the trainer reads:

  python -m mobilenet_jax.arrays --config=configs/cifar.py \
      --config.data.dir=../shared/tensorflow_datasets --out=data/cifar10 --chunk_mb=62
  python run.py --config=configs/cifar.py --config.data.name=npz:data/cifar10 --workdir=...

Chunks let a dataset larger than one transfer travel in several (CIFAR-10 is 184 MB as uint8:
three chunks of 62 MB or less; benchmarks/device_check.py says how they reach a GPU machine).
"""
import glob
import os
import re

import numpy as np

from mobilenet_jax import errors

PREFIX = "npz:"
SPLITS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
NAMES_KEY = "label_names"
_CHUNK = re.compile(r".*-(\d{5})-of-(\d{5})\.npz$")


class ArraysError(errors.UserError, ValueError):
  """An arrays dataset that cannot be used as one: run.py prints it as one line."""


def is_arrays(dataset: str) -> bool:
  return dataset.startswith(PREFIX)


def _path(config) -> str:
  return os.path.expanduser(config.data.name[len(PREFIX):])


def chunk_files(path: str) -> list[str]:
  """The .npz files of PATH (one file, or a folder's chunks, every one of them present)."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise ArraysError(f"config.data.name='npz:{path}': no such file or folder; write one with "
                      "`python -m mobilenet_jax.arrays --out=PATH` (its docstring says how).")
  files = sorted(glob.glob(os.path.join(path, "*.npz")))
  if not files:
    raise ArraysError(f"config.data.name='npz:{path}': the folder holds no .npz files.")
  counts = {m.group(2) for m in map(_CHUNK.match, files) if m}
  if counts:
    expected = int(counts.pop())
    if counts or len(files) != expected:
      raise ArraysError(f"{path}: {len(files)} .npz files, but their names say "
                        f"{expected} chunks: copy the missing ones (or remove strays) and rerun.")
  return files


def _checked(file: str, key: str, array: np.ndarray, labels: bool) -> np.ndarray:
  """`array` as uint8 RGB images or int32 labels, or an ArraysError naming the file and key."""
  if labels:
    if not np.issubdtype(array.dtype, np.integer) or not (
        array.ndim == 1 or array.ndim == 2 and array.shape[1] == 1):
      raise ArraysError(f"{file}: {key} is {array.dtype} {array.shape}; expected integer labels "
                        "of shape (n,) or (n, 1).")
    return array.reshape(-1).astype(np.int32)
  if array.dtype != np.uint8 or not (array.ndim == 3 or array.ndim == 4 and
                                     array.shape[-1] in (1, 3)):
    raise ArraysError(f"{file}: {key} is {array.dtype} {array.shape}; expected uint8 images of "
                      "shape (n, height, width, 3) (or grayscale (n, height, width)).")
  if array.ndim == 3:
    array = array[..., None]
  return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _read_chunk(file: str) -> dict:
  """A chunk's arrays, checked: {key: array}, `label_names` a tuple when present."""
  try:
    with np.load(file, allow_pickle=False) as npz:
      contents = {key: npz[key] for key in npz.files}
  except (OSError, ValueError, EOFError) as e:
    raise ArraysError(f"{file}: not a readable .npz file ({e}); write it again.") from e
  out = {}
  for x_key, y_key in SPLITS.values():
    if (x_key in contents) != (y_key in contents):
      present, missing = (x_key, y_key) if x_key in contents else (y_key, x_key)
      raise ArraysError(f"{file}: has {present} but no {missing}.")
    if x_key in contents:
      out[x_key] = _checked(file, x_key, contents[x_key], labels=False)
      out[y_key] = _checked(file, y_key, contents[y_key], labels=True)
      if len(out[x_key]) != len(out[y_key]):
        raise ArraysError(f"{file}: {x_key} has {len(out[x_key])} images but {y_key} "
                          f"{len(out[y_key])} labels.")
  if NAMES_KEY in contents:
    out[NAMES_KEY] = tuple(str(n) for n in contents[NAMES_KEY].reshape(-1))
  return out


def _names(files, chunks, config) -> tuple[str, ...]:
  """The class names: the files' (every chunk that has them agreeing), the config's, or the
  label numbers of config.model.num_classes."""
  found = {c[NAMES_KEY] for c in chunks if NAMES_KEY in c}
  if len(found) > 1:
    raise ArraysError(f"{os.path.dirname(files[0])}: the chunks' {NAMES_KEY} differ.")
  if found:
    return found.pop()
  if config.data.class_names:
    return tuple(config.data.class_names)
  return tuple(str(i) for i in range(config.model.num_classes))


def load(config):
  """(train, test, class names) of `config.data.name`, each split an `input_pipeline.Split` of
  its first `config.data.train_examples` / `eval_examples` rows."""
  from mobilenet_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  files = chunk_files(_path(config))
  chunks = [_read_chunk(f) for f in files]
  names = _names(files, chunks, config)
  splits = []
  for split, (x_key, y_key), limit in zip(SPLITS, SPLITS.values(),
                                          (config.data.train_examples,
                                           config.data.eval_examples)):
    parts = [c for c in chunks if x_key in c]
    if not parts:
      raise ArraysError(f"{_path(config)}: no {x_key} and {y_key} (the {split} split) in "
                        f"{', '.join(os.path.basename(f) for f in files)}.")
    shapes = {c[x_key].shape[1:] for c in parts}
    if len(shapes) > 1:
      raise ArraysError(f"{_path(config)}: {x_key}'s images differ in shape between chunks "
                        f"({sorted(shapes)}).")
    images = np.concatenate([c[x_key] for c in parts])[:limit]
    labels = np.concatenate([c[y_key] for c in parts])[:limit]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
      bad = labels[(labels < 0) | (labels >= len(names))][0]
      file = next(f for f, c in zip(files, chunks) if y_key in c and bad in c[y_key])
      raise ArraysError(f"{file}: {y_key} holds label {bad}, outside [0, {len(names)}) for the "
                        f"{len(names)} classes ({NAMES_KEY} in the file, else "
                        "config.data.class_names, else config.model.num_classes).")
    splits.append(input_pipeline.Split(images, labels))
  return splits[0], splits[1], names


def write(data, out: str, chunk_bytes: int | None = None) -> list[str]:
  """Writes an `input_pipeline.Dataset` (its splits in host memory) as arrays: `out` (a file
  ending in .npz) whole, or with `chunk_bytes` a folder `out` of chunks of at most that many
  bytes of images (at least one image each). Returns the files written."""
  n_train, n_rows = len(data.train), len(data.train) + len(data.test)
  per_chunk = n_rows if not chunk_bytes else max(1, chunk_bytes // data.train.images[0].nbytes)
  starts = range(0, n_rows, per_chunk)
  name = os.path.basename(os.path.normpath(out)).removesuffix(".npz")
  if chunk_bytes:
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, f"{name}-{k:05d}-of-{len(starts):05d}.npz")
             for k in range(len(starts))]
  else:
    files = [out if out.endswith(".npz") else out + ".npz"]
  dtype = np.min_scalar_type(max(len(data.label_names) - 1, 0))
  for file, start in zip(files, starts):
    arrays = {NAMES_KEY: np.asarray(data.label_names, str)}
    # Rows [start, stop) of the training split followed by the test split.
    stop = min(start + per_chunk, n_rows)
    for (source, offset), (x_key, y_key) in zip(((data.train, 0), (data.test, n_train)),
                                                SPLITS.values()):
      first, last = max(start - offset, 0), min(stop - offset, len(source))
      if first < last:
        arrays[x_key] = source.images[first:last]
        arrays[y_key] = source.labels[first:last, None].astype(dtype)
    tmp = file + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, file)  # Whole or not at all: a reader never sees half a chunk.
  return files


def main(argv):
  """`python -m mobilenet_jax.arrays --config=... --out=PATH [--chunk_mb=N]`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import config_lib, datasets  # pylint: disable=g-import-not-at-top
  del argv
  try:
    config = config_lib.from_flags()
    config.input.mode = "device"  # Image files are read whole, fitted to input.image_size.
    data, _ = datasets.load(config)
  except errors.UserError as e:
    config_lib.fail(e)
  chunk = flags.FLAGS.chunk_mb
  files = write(data, flags.FLAGS.out, int(chunk * 1e6) if chunk else None)
  print(f"{config.data.name}: {len(data.train)} training and {len(data.test)} test images, "
        f"{len(data.label_names)} classes -> {len(files)} file(s): "
        f"{', '.join(files[:3])}{' ...' if len(files) > 3 else ''}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import config_lib  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("config", None, "The dataset's config, e.g. configs/cifar.py (its data "
                      "group and input.image_size); --config.FIELD=VALUE overrides a field.")
  flags.DEFINE_string("out", None, "A file (NAME.npz) or, with --chunk_mb, a folder of chunks.")
  flags.DEFINE_float("chunk_mb", None, "Most megabytes (1e6 bytes) of images per chunk file.")
  flags.mark_flags_as_required(["config", "out"])
  app.run(main, flags_parser=config_lib.parse_flags)
