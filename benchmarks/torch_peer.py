r"""The PyTorch peer: the two CIFAR reference networks in PyTorch, timed on a CPU or a GPU.

  python benchmarks/torch_peer.py --layout keras --batch 128                  # CPU, eager
  python benchmarks/torch_peer.py --layout torch --device cuda --dtype bfloat16 \
      --modes eager channels_last compiled --repeats 5

Prints one JSON line: for each mode, training and inference images/s (medians over
`--repeats` rounds, the modes taking turns within a round). The networks are the ones
`configs/cifar.py` reproduces exactly, so both sides do the same arithmetic:
- `keras`: the Keras CIFAR script's layout: stem stride 2, conv biases, TensorFlow's 'same'
  padding (a stride-2 conv pads 0 before and 1 after), BatchNorm eps 1e-3, momentum 0.01;
- `torch`: the PyTorch CIFAR script's (kuangliu/pytorch-cifar): stem stride 1, no biases,
  `padding=1`, PyTorch's BatchNorm defaults.
Training is SGD with Nesterov momentum 0.9 and weight decay 1e-4 in the optimizer (the same
arithmetic as L2 in the loss), on one batch already on the device. Modes: `eager`;
`channels_last` (NHWC memory format, cuDNN's fast path); `compiled` (channels-last and
`torch.compile`). `--dtype bfloat16` runs each mode under `torch.autocast` (parameters stay
float32, as `model.dtype=bfloat16` keeps them in JAX).
"""
import argparse
import contextlib
import json
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

# (output channels, stride) of the 13 depthwise-separable blocks (models.BLOCKS).
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
          (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
LAYOUTS = {"keras": {"stem_stride": 2, "bias": True, "same": True, "eps": 1e-3, "momentum": 0.01},
           "torch": {"stem_stride": 1, "bias": False, "same": False, "eps": 1e-5,
                     "momentum": 0.1}}
MODES = ("eager", "channels_last", "compiled")


class ConvBNReLU(nn.Module):
  """A 3x3 (or 1x1) conv, BatchNorm and ReLU, padded as the layout pads."""

  def __init__(self, cin, cout, kernel, stride, groups, layout):
    super().__init__()
    self.same, self.stride, self.kernel = layout["same"], stride, kernel
    padding = 0 if layout["same"] else kernel // 2
    self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups,
                          bias=layout["bias"])
    self.bn = nn.BatchNorm2d(cout, eps=layout["eps"], momentum=layout["momentum"])

  def forward(self, x):
    if self.same and self.kernel > 1:  # TensorFlow's 'same': the extra row and column after.
      pads = []
      for size in (x.shape[3], x.shape[2]):
        total = max((-(-size // self.stride) - 1) * self.stride + self.kernel - size, 0)
        pads += [total // 2, total - total // 2]
      x = F.pad(x, pads)
    return F.relu(self.bn(self.conv(x)))


class MobileNetV1(nn.Module):
  def __init__(self, layout="keras", alpha=1.0, num_classes=10):
    super().__init__()
    spec = LAYOUTS[layout]
    c = int(32 * alpha)
    layers = [ConvBNReLU(3, c, 3, spec["stem_stride"], 1, spec)]
    for out, stride in BLOCKS:
      out = int(out * alpha)
      layers += [ConvBNReLU(c, c, 3, stride, c, spec), ConvBNReLU(c, out, 1, 1, 1, spec)]
      c = out
    self.features = nn.Sequential(*layers)
    self.fc = nn.Linear(c, num_classes)

  def forward(self, x):
    return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def _mode(args, mode):
  """(train step, inference call) of one mode on a fresh model (seed 0) and fixed batch."""
  torch.manual_seed(0)
  fmt = torch.contiguous_format if mode == "eager" else torch.channels_last
  model = MobileNetV1(args.layout, args.alpha).to(args.device, memory_format=fmt)
  x = torch.randn(args.batch, 3, args.image_size, args.image_size,
                  device=args.device).to(memory_format=fmt)
  y = torch.randint(0, 10, (args.batch,), device=args.device)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                        weight_decay=1e-4)
  forward = torch.compile(model) if mode == "compiled" else model
  autocast = lambda: (torch.autocast(args.device, torch.bfloat16) if args.dtype == "bfloat16"
                      else contextlib.nullcontext())

  def train():
    model.train()
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = F.cross_entropy(forward(x), y)
    loss.backward()
    opt.step()

  def infer():
    model.eval()
    with torch.no_grad(), autocast():
      forward(x)

  return train, infer


def _rate(args, fn, steps):
  sync = torch.cuda.synchronize if args.device == "cuda" else lambda: None
  sync()
  start = time.perf_counter()
  for _ in range(steps):
    fn()
  sync()
  return args.batch * steps / (time.perf_counter() - start)


def measure(args) -> dict:
  """{mode: {'train_img_s', 'infer_img_s'}}: medians over the rounds, after warm-up."""
  calls = {mode: _mode(args, mode) for mode in args.modes}
  timed = lambda train, infer: ({"infer_img_s": (infer, args.steps * 4)} if args.infer_only else
                                {"train_img_s": (train, args.steps),
                                 "infer_img_s": (infer, args.steps * 4)})
  for calls_of_mode in calls.values():  # Warm-up: compilation, cuDNN's autotuning, allocations.
    for fn, _ in timed(*calls_of_mode).values():
      _rate(args, fn, args.warmup)
  rates = {mode: {} for mode in args.modes}
  for _ in range(args.repeats):
    for mode, calls_of_mode in calls.items():
      for name, (fn, steps) in timed(*calls_of_mode).items():
        rates[mode].setdefault(name, []).append(_rate(args, fn, steps))
  return {mode: {k: statistics.median(v) for k, v in r.items()} for mode, r in rates.items()}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layout", choices=sorted(LAYOUTS), default="keras")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--alpha", type=float, default=1.0)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--modes", nargs="+", choices=MODES, default=["eager"])
  p.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--infer-only", action="store_true", help="time inference alone")
  return p.parse_args(argv)


def main():
  args = parse_args()
  torch.backends.cudnn.benchmark = True  # As any PyTorch training script sets on a GPU.
  row = {"torch": torch.__version__, "threads": torch.get_num_threads(), **vars(args),
         "params": sum(p.numel() for p in MobileNetV1(args.layout, args.alpha).parameters()),
         "rates": measure(args)}
  print(json.dumps(row))


if __name__ == "__main__":
  main()
