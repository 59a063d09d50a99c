"""npz: datasets (arrays.py): Keras' arrays read as the trainer reads tfds, chunks, bad files.

No TensorFlow here (benchmarks/device_check.py runs this file on a GPU machine without it); the
tfds -> arrays -> training round trip is in test_train.py.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_image_folder, run_mocked, smoke_args
from configs import cifar
from mobilenet_jax import arrays, datasets, input_pipeline


def _config(path, **data):
  """The smoke config reading `path`, with `data` fields set."""
  config = cifar.get_config("smoke")
  config.data.update({"name": f"npz:{path}", "train_examples": None, "eval_examples": None,
                      **data})
  return config


def _keras_arrays(n_train=30, n_test=12, classes=10, seed=0):
  """What keras.datasets.cifar10.load_data() returns, at toy size: uint8 NHWC, (n, 1) labels."""
  rng = np.random.default_rng(seed)
  return {"x_train": rng.integers(0, 256, (n_train, 8, 8, 3), np.uint8),
          "y_train": rng.integers(0, classes, (n_train, 1), np.uint8),
          "x_test": rng.integers(0, 256, (n_test, 8, 8, 3), np.uint8),
          "y_test": rng.integers(0, classes, (n_test, 1), np.uint8)}


def test_keras_arrays_load_as_splits_with_names_from_file_config_or_numbers(tmp_path):
  keras = _keras_arrays()
  np.savez(tmp_path / "plain.npz", **keras)
  np.savez(tmp_path / "named.npz", **keras, label_names=np.asarray([f"c{i}" for i in range(10)]))

  train, test, names = arrays.load(_config(tmp_path / "plain.npz"))
  np.testing.assert_array_equal(train.images, keras["x_train"])
  np.testing.assert_array_equal(test.labels, keras["y_test"][:, 0])
  assert train.labels.dtype == np.int32 and train.labels.shape == (30,)
  assert names == tuple(str(i) for i in range(10))
  assert arrays.load(_config(tmp_path / "named.npz"))[2] == tuple(f"c{i}" for i in range(10))
  named = _config(tmp_path / "plain.npz", class_names=tuple("abcdefghij"))
  assert arrays.load(named)[2] == tuple("abcdefghij")
  limited = arrays.load(_config(tmp_path / "plain.npz", train_examples=7, eval_examples=5))
  assert len(limited[0]) == 7 and len(limited[1]) == 5
  np.testing.assert_array_equal(limited[0].images, keras["x_train"][:7])


def test_grayscale_arrays_are_read_as_rgb(tmp_path):
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (6, 5, 5), np.uint8)
  np.savez(tmp_path / "mnist.npz", x_train=gray, y_train=np.arange(6), x_test=gray[:2, ..., None],
           y_test=np.arange(2))
  train, test, _ = arrays.load(_config(tmp_path / "mnist.npz"))
  assert train.images.shape == (6, 5, 5, 3) and test.images.shape == (2, 5, 5, 3)
  for c in range(3):
    np.testing.assert_array_equal(train.images[..., c], gray)


def test_chunks_hold_at_most_their_size_and_read_back_whole(tmp_path):
  keras = _keras_arrays(n_train=30, n_test=12)
  data = input_pipeline.Dataset(input_pipeline.Split(keras["x_train"], keras["y_train"][:, 0]),
                                input_pipeline.Split(keras["x_test"], keras["y_test"][:, 0]),
                                10, tuple(f"c{i}" for i in range(10)))
  row = 8 * 8 * 3
  files = arrays.write(data, str(tmp_path / "toy"), chunk_bytes=10 * row + row // 2)
  assert [os.path.basename(f) for f in files] == [f"toy-{k:05d}-of-00005.npz" for k in range(5)]
  for file in files:  # 10 images a chunk: the third holds the last of train and the first of test.
    with np.load(file) as npz:
      assert sum(npz[k].nbytes for k in ("x_train", "x_test") if k in npz) <= 10 * row
      assert npz["y_train" if "y_train" in npz else "y_test"].shape[1:] == (1,)  # Keras' labels.
  train, test, names = arrays.load(_config(tmp_path / "toy"))
  np.testing.assert_array_equal(train.images, keras["x_train"])
  np.testing.assert_array_equal(train.labels, keras["y_train"][:, 0])
  np.testing.assert_array_equal(test.images, keras["x_test"])
  np.testing.assert_array_equal(test.labels, keras["y_test"][:, 0])
  assert names == data.label_names

  os.remove(files[2])  # A chunk that has not arrived yet.
  with pytest.raises(arrays.ArraysError, match=r"4 \.npz files, but their names say 5 chunks"):
    arrays.load(_config(tmp_path / "toy"))


@pytest.mark.parametrize("change,file_and_key", [
    (lambda a: [a.pop(k) for k in ("x_test", "y_test")], "no x_test and y_test"),
    (lambda a: a.pop("y_train"), "has x_train but no y_train"),
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32)), "x_train is float32"),
    (lambda a: a.update(x_test=a["x_test"][..., :2]), r"x_test is uint8 \(12, 8, 8, 2\)"),
    (lambda a: a.update(y_train=np.zeros((30, 2), np.int64)), r"y_train is int64 \(30, 2\)"),
    (lambda a: a.update(y_test=np.full((12, 1), 10, np.uint8)), "y_test holds label 10"),
    (lambda a: a.update(y_train=a["y_train"][:29]), "x_train has 30 images but y_train 29"),
])
def test_a_bad_file_names_itself_and_the_key(tmp_path, change, file_and_key):
  keras = _keras_arrays()
  change(keras)
  np.savez(tmp_path / "bad.npz", **keras)
  with pytest.raises(arrays.ArraysError, match=f"^{re.escape(str(tmp_path / 'bad.npz'))}: "
                     f"{file_and_key}"):
    arrays.load(_config(tmp_path / "bad.npz"))


def test_not_an_npz_file_and_a_missing_path(tmp_path):
  (tmp_path / "x.npz").write_bytes(b"not a zip")
  with pytest.raises(arrays.ArraysError, match="x.npz: not a readable .npz file"):
    arrays.load(_config(tmp_path / "x.npz"))
  with pytest.raises(arrays.ArraysError, match="no such file or folder"):
    arrays.load(_config(tmp_path / "missing"))


@pytest.mark.slow
def test_run_py_stops_on_a_bad_file_with_one_line(tmp_path):
  keras = _keras_arrays()
  keras["y_test"][3] = 200
  np.savez(tmp_path / "bad.npz", **keras)
  result = run_mocked(*smoke_args(tmp_path / "w", f"--config.data.name=npz:{tmp_path}/bad.npz"))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: {tmp_path}/bad.npz: y_test holds label 200, outside [0, 10) for the 10 classes "
      "(label_names in the file, else config.data.class_names, else config.model.num_classes)."]
  assert not os.path.exists(tmp_path / "w" / "config.json")


@pytest.mark.slow
def test_the_command_writes_a_folder_dataset_as_the_trainer_reads_it(tmp_path):
  folder = make_image_folder(tmp_path / "photos", num_classes=3, per_class=6)
  flags = ["--config=configs/cifar.py", f"--config.data.name=folder:{folder}",
           "--config.input.image_size=16", "--config.data.folder_holdout=0.5"]
  result = subprocess.run([sys.executable, "-m", "mobilenet_jax.arrays", *flags,
                           f"--out={tmp_path}/photos_npz", "--chunk_mb=0.002"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert len(os.listdir(tmp_path / "photos_npz")) == 9  # 18 images of 16x16x3, 2 a chunk.

  config = cifar.get_config()
  config.update_from_flattened_dict({"data.name": f"folder:{folder}", "input.image_size": 16,
                                     "data.folder_holdout": 0.5})
  expected, _ = datasets.load(config)
  train, test, names = arrays.load(_config(tmp_path / "photos_npz"))
  for got, want in ((train, expected.train), (test, expected.test)):
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.labels, want.labels)
  assert names == expected.label_names == ("class_0", "class_1", "class_2")
