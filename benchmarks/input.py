r"""Streamed input against the device pipeline, side by side, and the host's JPEG decode rate.

  python benchmarks/input.py                 # CIFAR-10 (../shared/tensorflow_datasets), batch 128
  python benchmarks/input.py --preset=quick --steps=30 --repeats=5 --json

- train loop: the training loop's step as `train.py` runs it, over `--steps` steps, with each
  feed: `device` (the dataset on device, the batch gathered there) and `stream` (each batch
  read on the host and put on the device `config.input.prefetch` steps ahead). The two train the
  same model (tests/test_streaming.py), so the ratio is the price of streaming alone.
- decode: 224-pixel training images as a streamed folder makes them (`FileSource.read`,
  then `inception_crop`) from generated JPEGs of ImageNet's typical 500x375, on
  `--workers` threads: what a host can feed an ImageNet run.
Figures are medians over `--repeats` rounds, the ratio the median of each round's ratio.
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from PIL import Image

from configs import cifar  # pylint: disable=g-import-not-at-top
from mobilenet_jax import datasets, folders, images, models, optimizers, parallel, steps, streaming


def _feed_timer(config, data, mode, num_steps):
  """A function that times `num_steps` training steps fed by `mode`; returns images/s."""
  runner = parallel.create_runner(config, len(data.train), streamed=mode == "stream")
  feed = (streaming.StreamFeed(config, runner, data.train, data.test) if mode == "stream"
          else parallel.DeviceFeed(runner, data))
  state = runner.put_state(steps.create_train_state(
      models.create_model(config.model),
      optimizers.create_optimizer(config, runner.steps_per_epoch), jax.random.key(0),
      config.input.image_size))
  holder = {"state": state, "step": 0}

  def run(n):
    start_step = holder["step"] % runner.steps_per_epoch
    stop = min(start_step + n, runner.steps_per_epoch)
    start = time.perf_counter()
    for args in feed.train_steps(holder["state"], start_step, stop):
      holder["state"], metrics = runner.train(holder["state"], *args)
    jax.block_until_ready(metrics)
    holder["step"] = stop
    return (stop - start_step) * config.input.batch_size / (time.perf_counter() - start)

  run(2)  # Compile.
  return lambda: run(num_steps)


def _decode_rate(workers: int, num_images: int = 64) -> float:
  """224-pixel random-resized crops per second from 500x375 JPEGs, on `workers` threads."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[:375, :500]
  with tempfile.TemporaryDirectory() as root:
    paths = [os.path.join(root, f"{i}.jpg") for i in range(num_images)]
    for i, path in enumerate(paths):
      # Smooth content (noise compresses badly and decodes slowly): a gradient with a texture.
      image = np.stack([x % 256, y % 256, (x * y + i * 997) % 256], -1) * 0.8 + rng.integers(
          0, 50, (375, 500, 3))
      Image.fromarray(image.astype(np.uint8)).save(path, quality=90)
    source = folders.FileSource(tuple(paths), np.zeros(num_images, np.int32))
    crop = lambda j: images.inception_crop(source.read(j), np.random.default_rng(j), 224)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(crop, range(8)))  # Warm-up.
      start = time.perf_counter()
      list(pool.map(crop, range(num_images)))
      return num_images / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", default="", help="configs/cifar.py preset ('': Keras recipe)")
  parser.add_argument("--data_dir", default=str(ROOT.parent / "shared" / "tensorflow_datasets"))
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workers", type=int, default=os.cpu_count())
  parser.add_argument("--json", action="store_true")
  args = parser.parse_args()
  config = cifar.get_config(args.preset)
  config.data.update(dir=args.data_dir, download=False)
  config.input.mode = "device"
  data, _ = datasets.load(config)
  timers = {mode: _feed_timer(config, data, mode, args.steps) for mode in ("device", "stream")}
  rounds = {mode: [] for mode in timers}
  for _ in range(args.repeats):
    for mode, timer in timers.items():
      rounds[mode].append(timer())
  decode = statistics.median(_decode_rate(args.workers) for _ in range(args.repeats))
  result = {"preset": args.preset or "keras", "batch": config.input.batch_size,
            "device_img_s": statistics.median(rounds["device"]),
            "stream_img_s": statistics.median(rounds["stream"]),
            "stream_over_device": statistics.median(
                s / d for s, d in zip(rounds["stream"], rounds["device"])),
            "decode_224_img_s": decode, "decode_workers": args.workers,
            "cpus": os.cpu_count(), "backend": jax.default_backend()}
  if args.json:
    print(json.dumps(result))
    return
  print(f"| input (CIFAR-10, {result['preset']}, batch {result['batch']}) | images/s |\n|---|---|")
  print(f"| device: dataset on device, batch gathered there | {result['device_img_s']:.0f} |")
  print(f"| stream: batch read on the host, prefetched | {result['stream_img_s']:.0f} |")
  print(f"| stream / device | {result['stream_over_device']:.2f}x |")
  print(f"| host decode + random-resized crop, 224 px JPEG, {args.workers} threads | "
        f"{decode:.0f} |")


if __name__ == "__main__":
  main()
