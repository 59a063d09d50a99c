"""Streamed input and folder datasets: the same training as the device pipeline, the host's
crops, ImageNet's recipe on two processes (kill and resume, every example evaluated once), and
the errors for folders that cannot be datasets."""
import json
import re
import signal

import numpy as np
import pytest

from conftest import (EVERY_AUGMENTATION, assert_same_state, make_image_folder, restore_latest,
                      run_mocked, start_processes, wait_all, wait_for_checkpoint)
from mobilenet_jax import config_lib, datasets, errors, folders, images, predict, streaming
from mobilenet_jax import train


def _train_both_ways(config, tmp_path):
  """Final states of `config` trained with device input, then streamed."""
  states = []
  for mode in ("device", "stream"):
    config.input.mode = mode
    results = train.train_and_evaluate(config, str(tmp_path / mode))
    states.append((restore_latest(tmp_path / mode, config), results))
  return states


@pytest.mark.slow
def test_streamed_cifar_trains_exactly_as_on_device(mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.update_from_flattened_dict({**EVERY_AUGMENTATION, "num_epochs": 1})
  (device, device_results), (stream, stream_results) = _train_both_ways(smoke_config, tmp_path)
  assert_same_state(device, stream)
  # The device pipeline adds up the eval batches in float32, the stream in float64.
  assert stream_results["test_loss"] == pytest.approx(device_results["test_loss"], rel=1e-6)
  assert stream_results["test_accuracy"] == device_results["test_accuracy"]
  assert stream_results["test_examples"] == 40


@pytest.mark.slow
def test_a_folder_trains_the_same_streamed_or_on_device_and_predict_names_its_classes(
    smoke_config, tmp_path):
  root = make_image_folder(tmp_path / "images", num_classes=3, per_class=20)
  smoke_config.update_from_flattened_dict({"data.name": f"folder:{root}", "num_epochs": 1,
                                           "input.image_size": 24})
  smoke_config.model.num_classes = 3
  (device, device_results), (stream, _) = _train_both_ways(smoke_config, tmp_path)
  assert_same_state(device, stream)
  assert device_results["test_examples"] == 6  # 10% of each class's 20 held out.
  [top] = predict.predict(str(tmp_path / "stream"), [str(root / "class_1" / "0000.jpg")], top=3)
  assert sorted(name for name, _ in top) == ["class_0", "class_1", "class_2"]


@pytest.mark.parametrize("layout", ["", "train"])  # Class folders in PATH, or in PATH/train.
def test_the_holdout_is_a_share_of_each_class_the_same_every_time(smoke_config, tmp_path,
                                                                  layout):
  root = tmp_path
  make_image_folder(root / layout, num_classes=2, per_class=30)
  smoke_config.update_from_flattened_dict({"data.name": f"folder:{root}",
                                           "data.folder_holdout": 0.2})
  train_a, test_a, names = folders.load(smoke_config)
  train_b, test_b, _ = folders.load(smoke_config)
  assert names == ("class_0", "class_1")
  assert train_a.paths == train_b.paths and test_a.paths == test_b.paths
  assert np.bincount(test_a.labels).tolist() == [6, 6] and len(train_a) == 48
  assert not set(train_a.paths) & set(test_a.paths)


def test_inception_crop_is_drawn_from_its_rng_within_the_image():
  # Each pixel holds its own coordinates: a crop shows which part of the image it took.
  h, w = 60, 90
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  image = np.stack([rows * 4, cols * 2, np.zeros_like(rows)], -1).astype(np.uint8)
  crops = [images.inception_crop(image, np.random.default_rng(i), 32) for i in range(40)]
  assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in crops)
  np.testing.assert_array_equal(crops[0],
                                images.inception_crop(image, np.random.default_rng(0), 32))
  heights = [np.ptp(c[..., 0].astype(int)) / 4 for c in crops]
  assert min(heights) < 0.6 * h and max(heights) > 0.6 * h  # Random scales, none outside.
  flipped = [c[0, 0, 1] > c[0, -1, 1] for c in crops]
  assert 8 <= sum(flipped) <= 32  # About half mirrored.


def _folder_config(smoke_config, root, fields):
  smoke_config.update_from_flattened_dict({"data.name": f"folder:{root}", **fields})
  return smoke_config


@pytest.mark.parametrize("setup, fields, message", [
    (lambda root: None, {}, "is not a folder.*ImageNet's download .* in configs/imagenet.py"),
    (lambda root: root.mkdir(), {}, "0 class subfolder"),
    (lambda root: make_image_folder(root, num_classes=1), {}, "1 class subfolder.*at least 2"),
    (lambda root: [(root / n).mkdir(parents=True) for n in ("a", "b")], {}, "no training images"),
    (lambda root: make_image_folder(root), {"data.folder_holdout": 0.0}, "folder_holdout=0.0"),
])
def test_a_folder_that_is_no_dataset_is_a_clear_error(smoke_config, tmp_path, setup, fields,
                                                      message):
  root = tmp_path / "data"
  setup(root)
  with pytest.raises(folders.FolderError, match=message):
    datasets.load(_folder_config(smoke_config, root, fields))


@pytest.mark.slow
def test_an_unreadable_image_stops_the_run_naming_the_file(tmp_path):
  root = make_image_folder(tmp_path / "data", num_classes=2, per_class=20)
  for bad in (root / "class_1").iterdir():  # Every step reads some of them.
    bad.write_bytes(b"not a jpeg")
  result = run_mocked("--config=configs/cifar.py:smoke", "--config.log.progress_bar=False",
                      f"--config.data.name=folder:{root}", "--config.input.mode=stream",
                      "--config.model.num_classes=2", f"--workdir={tmp_path / 'run'}",
                      timeout=300)
  assert result.returncode != 0
  assert re.search(f"{root}/class_1/\\d+.jpg: not a readable image", result.stderr), (
      result.stderr[-3000:])
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("fields, message", [
    ({"augment.name": "inception"}, "crops image files on the host"),
    ({"augment.name": "inception", "data.name": "folder:x", "input.mode": "device"},
     "use --config.input.mode"),
    ({"input.mode": "disk"}, "config.input.mode='disk'"),
    ({"input.device_share": 0.0}, "config.input.device_share=0.0"),
    ({"input.prefetch": 0}, "config.input.prefetch=0"),
    ({"schedule.reference_batch": 0}, "config.schedule.reference_batch=0"),
])
def test_bad_input_settings_are_rejected_before_training(smoke_config, tmp_path, fields, message):
  smoke_config.update_from_flattened_dict(fields)
  with pytest.raises(ValueError, match=message):
    config_lib.check_config(smoke_config, str(tmp_path))


@pytest.mark.slow
def test_imagenet_from_tfds_unprepared_points_at_the_manual_download_steps(tmp_path):
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config("keras")
  config.update_from_flattened_dict({"data.dir": str(tmp_path), "data.download": False})
  with pytest.raises(streaming.input_pipeline.DatasetUnavailableError,
                     match="downloaded by hand: follow the steps in configs/imagenet.py"):
    datasets.load(config)


@pytest.mark.slow
def test_streaming_runs_under_jit_only(mock_tfds, smoke_config, tmp_path):
  del mock_tfds
  smoke_config.update_from_flattened_dict({"input.mode": "stream", "parallel": "pmap"})
  with pytest.raises(errors.ConfigError, match="--config.parallel=jit"):
    train.train_and_evaluate(smoke_config, str(tmp_path))


def test_auto_streams_what_exceeds_its_share_of_device_memory(smoke_config, monkeypatch, caplog):
  split = streaming.input_pipeline.Split(np.zeros((100, 8, 8, 3), np.uint8), np.zeros(100))
  monkeypatch.setattr(datasets, "device_memory_bytes", lambda: 40_000)
  smoke_config.input.mode = "auto"
  caplog.set_level("INFO")
  for share, mode in ((0.4, "stream"), (0.5, "device")):  # The split takes 19,200 bytes.
    smoke_config.input.device_share = share
    assert datasets.input_mode(smoke_config, split) == mode
  assert "config.input.mode='auto'" in caplog.text


# ImageNet's recipe (configs/imagenet.py:train), scaled down to 4 classes of 16 images at 32x32.
STEPS_PER_EPOCH = 4  # 64 images in global batches of 16.
IMAGENET = ["--config=configs/imagenet.py:train", "--config.input.image_size=32",
            "--config.model.alpha=0.25", "--config.log.progress_bar=False",
            "--config.model.num_classes=4", "--config.checkpoint.keep=100",
            "--config.distributed.heartbeat_timeout_s=10", "--config.distributed.timeout_s=30"]


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  make_image_folder(root / "train", num_classes=4, per_class=16)
  make_image_folder(root / "val", num_classes=4, per_class=5, seed=1)  # 20: 2 batches, padded.
  return root


def _imagenet_config(root):
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  config = imagenet.get_config("train")
  config.update_from_flattened_dict({"data.name": f"folder:{root}", "input.image_size": 32})
  config.model.update(alpha=0.25, num_classes=4)
  return config


@pytest.mark.slow
def test_imagenet_recipe_on_two_processes_resumes_after_a_kill_as_a_straight_run(
    imagenet_folder, tmp_path):
  common = [*IMAGENET, f"--config.data.name=folder:{imagenet_folder}"]
  # The straight reference: one process with both devices, 16 images per process.
  reference = tmp_path / "reference"
  result = run_mocked(*common, "--config.input.per_process_batch_size=16", "--config.num_epochs=3",
                      f"--workdir={reference}",
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert result.returncode == 0, result.stderr[-3000:]

  workdir = tmp_path / "run"
  args = ["--config.input.per_process_batch_size=8"]
  runs = start_processes(common, workdir, *args, "--config.num_epochs=1000")
  wait_for_checkpoint(runs, workdir, STEPS_PER_EPOCH)
  runs[1][0].send_signal(signal.SIGKILL)
  codes, logs = wait_all(runs, timeout=60)
  assert codes[0] not in (0, "timeout"), logs[0][-3000:]

  codes, logs = wait_all(start_processes(common, workdir, *args, "--config.num_epochs=3"),
                         timeout=400)
  assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  assert "Resuming from the checkpoint at step" in logs[0]
  config = _imagenet_config(imagenet_folder)
  assert_same_state(restore_latest(workdir, config), restore_latest(reference, config))
  results = json.loads((workdir / "results.json").read_text())
  expected = json.loads((reference / "results.json").read_text())
  assert results["test_examples"] == 20  # Each validation image once; the padding masked.
  assert results["test_loss"] == expected["test_loss"]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["input"]["batch_size"] == 16 and saved["input"]["mode"] == "auto"
  assert json.loads((workdir / "label_names.json").read_text()) == [f"class_{c}" for c in range(4)]
