r"""Training and inference throughput of mobilenet-jax, side by side with the PyTorch peer.

  python benchmarks/throughput.py                       # both layouts, batch 128, float32
  python benchmarks/throughput.py --layout keras --conv lax shifted --json

The two layouts are the reference scripts' networks, as configs/cifar.py builds them: `keras`
(the default recipe: stem stride 2, conv biases, TensorFlow's padding) and `torch` (`:torch`,
stem stride 1). 
For each configuration it times, after warm-up, several rounds of
- train step: the jitted `steps.train_step` (augmentation, forward, backward, SGD, BN updates)
  on a batch already on device;
- train loop: the training loop's own compiled step (gather from the device-resident
  dataset by the epoch's permutation, then the train step), as `train.py` runs it, under
  `--parallel` (jit over a mesh, or pmap);
- inference: `inference.eval_logits` without test-time flips (normalization, then the model in
  inference mode), as evaluation and prediction run it: in sub-batches of
  `--inference-chunk` images (default: automatic, `inference.inference_chunk`);
- when torch is importable, the peer benchmarks/torch_peer.py for the same network (one
  process each round: eager, then channels-last + torch.compile for inference).
Each row also gives the arithmetic it achieved: MACs x 2 FLOPs per image, x 3 for training
(forward, and the backward pass's two products per layer).
Each figure is the median over rounds, and each ratio (loop/step, against the peer) the median
of the ratios within a round: this VM's speed jitters by +-15% between repetitions and drifts by
up to a third between minutes, so only measurements taken side by side compare.

`--free-depthwise` replaces each depthwise conv by its centre tap (`x * w[1, 1]`, same shapes
and strides, forward and backward by autodiff): what the step would cost if the depthwise conv
took no time, the most a faster depthwise kernel could gain. `--free-depthwise-and-norm` goes
further: the depthwise conv becomes a strided slice and BatchNorm the identity, so that only the
matrix products (the stem's im2col, the pointwise convs and the head) and the ReLUs remain, the
least work an inference pass can do (BatchNorm folds into the weights). (Without the ReLUs XLA
fuses consecutive matrix products into one YNNPACK call that runs several times slower.)
"""
import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from configs import cifar  # pylint: disable=g-import-not-at-top
from mobilenet_jax import convolutions, inference, input_pipeline, models, parallel, sampler, steps
from mobilenet_jax import optimizers, summary  # pylint: disable=g-import-not-at-top

PEER = ROOT / "benchmarks" / "torch_peer.py"
PRESETS = {"keras": "", "torch": "torch"}  # Each layout's preset in configs/cifar.py.
# The peer's inference figures; the best of them in each round is the one compared.
PEER_INFER = ("peer_infer_eager_img_s", "peer_infer_compiled_img_s")


def _timer(name, fn, batch, steps):
  """A repetition of `steps` calls of `fn`, as {name: images/s}."""
  def run():
    start = time.perf_counter()
    for _ in range(steps):
      out = fn()
    jax.block_until_ready(out)
    return {name: batch * steps / (time.perf_counter() - start)}
  return run


def _rounds(timers, repeats):
  """Each of `timers` (functions returning {figure: images/s}) once per round, in turn, for
  `repeats` rounds: {figure: [images/s of each round]}."""
  figures = {}
  for _ in range(repeats):
    for timer in timers:
      for name, rate in timer().items():
        figures.setdefault(name, []).append(rate)
  return figures


def _median_ratio(numerators, denominators):
  return statistics.median(a / b for a, b in zip(numerators, denominators))


def _centre_tap(x, kernel, strides, padding):
  """The depthwise conv's centre tap alone: its output shape at a fraction of its cost."""
  del padding  # Its cost is what matters here, not its alignment.
  kh, kw = kernel.shape[:2]
  return x[:, ::strides[0], ::strides[1]] * kernel[kh // 2, kw // 2, 0]


def _strided_slice(x, kernel, strides, padding):
  """The depthwise conv's output shape with no arithmetic (stride 1: `x` itself)."""
  del kernel, padding
  return x[:, ::strides[0], ::strides[1]]


class _NoNorm(nn.BatchNorm):
  """BatchNorm's variables (so the train step runs unchanged), none of its arithmetic."""

  @nn.compact
  def __call__(self, x, *args, **kwargs):
    del args, kwargs
    self.variable("batch_stats", "mean", jnp.zeros, (x.shape[-1],))
    return x


def _free_depthwise_and_norm():
  """Patches the model down to its matrix products and ReLUs (`--free-depthwise-and-norm`)."""
  convolutions.depthwise = _strided_slice
  conv_and_norm = models.conv_and_norm
  def conv_and_no_norm(*args, **kwargs):
    conv, norm = conv_and_norm(*args, **kwargs)
    return conv, functools.partial(_NoNorm, **norm.keywords)
  models.conv_and_norm = conv_and_no_norm


def measure(args, layout, impl, peer=None):
  """One configuration's row; `peer`: a timer (`peer_timer`) run in every round, or None."""
  config = cifar.get_config(PRESETS[layout])
  config.input.batch_size, config.parallel = args.batch, args.parallel
  config.model.update(alpha=args.alpha, dtype=args.dtype, conv=impl)
  config.eval.chunk = args.inference_chunk
  row = {"impl": "jax", "layout": layout, "conv": convolutions.resolve(impl),
         "stem_stride": config.model.stem_stride, "batch": args.batch, "alpha": args.alpha,
         "dtype": args.dtype, "parallel": args.parallel, "backend": jax.default_backend(),
         "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
         "macs": summary.summarize(models.create_model(config.model), config.input.image_size).macs,
         "inference_chunk": inference.inference_chunk(config)}
  if args.free_depthwise:
    row["conv"] += " (free depthwise)"
  if args.free_depthwise_and_norm:
    row["conv"] += " (free depthwise and BN)"
  timers, row["compile_s"] = _timers(args, config)
  with jax.transfer_guard_host_to_device("disallow"):
    for timer in timers:  # Warm-up: compilation, and the first calls' allocations.
      timer()
    rates = _rounds(timers + ([peer] if peer else []), args.repeats)
  row.update({name: statistics.median(r) for name, r in rates.items()})
  row["loop_vs_step"] = _median_ratio(rates["train_loop_img_s"], rates["train_step_img_s"])
  row["train_tflops"] = row["train_step_img_s"] * row["macs"] * 6 / 1e12
  row["infer_tflops"] = row["infer_img_s"] * row["macs"] * 2 / 1e12
  if peer:
    row.update(torch=peer.torch, peer_threads=peer.threads)
    best_infer = [max(r) for r in zip(*(rates[k] for k in PEER_INFER if k in rates))]
    row["train_ratio"] = _median_ratio(rates["train_step_img_s"], rates["peer_train_img_s"])
    row["infer_ratio"] = _median_ratio(rates["infer_img_s"], best_infer)
  return row


def _timers(args, config):
  """The bare train step, the training loop's step and inference, as timers; and the train
  step's compile time in seconds."""
  num_train = args.batch * 20
  rng = np.random.default_rng(0)
  split = input_pipeline.Split(rng.integers(0, 256, (num_train, 32, 32, 3), np.uint8),
                               rng.integers(0, 10, (num_train,), np.int32))
  runner = parallel.create_runner(config, num_train)
  model = models.create_model(config.model, axis_name=runner.axis_name)
  tx = optimizers.create_optimizer(config, runner.steps_per_epoch)
  initial = steps.create_train_state(model, tx, jax.random.key(0), config.input.image_size)
  state = runner.put_state(initial)

  # The bare train step on one fixed device batch, with its augmentation draws made once.
  batch = {"image": jnp.asarray(split.images[:args.batch]),
           "label": jnp.asarray(split.labels[:args.batch]),
           **sampler.augmentation_draws(jax.random.key(2), args.batch, config.augment.crop_padding)}
  step = jax.jit(lambda s, b, r: steps.train_step(s, b, r, config), donate_argnums=0)
  # One device's state, its BatchNorm unbound from pmap's axis (the step is jitted alone).
  step_state = {"state": jax.tree.map(jnp.copy, initial).replace(
      apply_fn=models.create_model(config.model).apply)}
  key = jax.random.key(1)
  start = time.perf_counter()
  step_state["state"], m = step(step_state["state"], batch, key)
  jax.block_until_ready(m)
  compile_s = round(time.perf_counter() - start, 1)
  def train_step():
    step_state["state"], metrics = step(step_state["state"], batch, key)
    return metrics

  # The training loop's step: gather by permutation from device-resident data, then train.
  data = runner.put_train_data(split)
  loop_state = {"state": state}
  perm = runner.shuffle(state)
  def loop_step():
    loop_state["state"], metrics = runner.train(loop_state["state"], data, perm)
    return metrics

  # Inference, as evaluation and prediction run it (in sub-batches on CPU; no test-time flips),
  # on a copy of the initial variables (the loop donates `state` when it first runs).
  variables = jax.device_put({"params": initial.params, "batch_stats": initial.batch_stats})
  infer_model = models.create_model(config.model)
  infer = jax.jit(lambda v, x: inference.eval_logits(infer_model.apply, v, x, config,
                                                     inference.Views()))
  return [_timer("train_step_img_s", train_step, args.batch, args.steps),
          _timer("train_loop_img_s", loop_step, args.batch, args.steps),
          _timer("infer_img_s", lambda: infer(variables, batch["image"]), args.batch,
                 args.steps * 4)], compile_s


def run_peer(layout, batch, alpha, dtype, steps, modes, *extra, timeout=None) -> dict:
  """benchmarks/torch_peer.py's JSON line for one configuration, run in its own process
  (raises CalledProcessError or TimeoutExpired)."""
  out = subprocess.run([sys.executable, str(PEER), "--layout", layout, "--batch", str(batch),
                        "--alpha", str(alpha), "--dtype", dtype, "--steps", str(steps),
                        "--modes", *modes, *extra],
                       capture_output=True, text=True, check=True, timeout=timeout)
  return json.loads(out.stdout.strip().splitlines()[-1])


def peer_timer(args, layout):
  """A timer that runs the PyTorch peer once (eager; then channels-last + torch.compile for
  inference unless --no-compile), or None without torch or with --no-peer."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return None
  if args.no_peer or not PEER.exists():
    return None
  def run(mode, *extra):
    peer = run_peer(layout, args.batch, args.alpha, args.dtype, args.steps, [mode], *extra)
    timer.torch, timer.threads = peer["torch"], peer["threads"]
    return peer["rates"][mode]
  def timer():
    eager = run("eager")
    rates = {"peer_train_img_s": eager["train_img_s"], PEER_INFER[0]: eager["infer_img_s"]}
    if not args.no_compile:
      rates[PEER_INFER[1]] = run("compiled", "--infer-only")["infer_img_s"]
    return rates
  return timer


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layout", nargs="+", default=["keras", "torch"], choices=sorted(PRESETS))
  p.add_argument("--parallel", default="jit", choices=("jit", "pmap"))
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--alpha", type=float, default=1.0)
  p.add_argument("--dtype", default="float32", choices=sorted(models.DTYPES))
  p.add_argument("--conv", nargs="+", default=["auto"], choices=convolutions.IMPLEMENTATIONS)
  p.add_argument("--inference-chunk", type=int, default=None,
                 help="images per inference sub-batch (default: automatic, see "
                      "inference.inference_chunk; 0: none)")
  p.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed rounds (medians reported; the peer runs once per round)")
  p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
  p.add_argument("--no-compile", action="store_true", help="skip the peer's torch.compile run")
  p.add_argument("--json", action="store_true", help="one JSON line per configuration")
  bounds = p.add_mutually_exclusive_group()  # Two upper bounds, one at a time.
  bounds.add_argument("--free-depthwise", action="store_true",
                      help="replace the depthwise conv by its centre tap (an upper bound, "
                           "see above)")
  bounds.add_argument("--free-depthwise-and-norm", action="store_true",
                      help="drop the depthwise convs and BatchNorm (an upper bound, see above)")
  args = p.parse_args()
  bound = ("--free-depthwise" if args.free_depthwise else
           "--free-depthwise-and-norm" if args.free_depthwise_and_norm else None)
  if bound and any(convolutions.resolve(impl) != "shifted" for impl in args.conv):
    p.error(f"{bound} replaces the shifted depthwise conv: use it with --conv shifted "
            "(or auto on CPU).")
  if args.free_depthwise:
    convolutions.depthwise = _centre_tap
  if args.free_depthwise_and_norm:
    _free_depthwise_and_norm()

  rows = []
  for layout in args.layout:
    for impl in args.conv:
      row = measure(args, layout, impl, peer_timer(args, layout))
      rows.append(row)
      if args.json:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
              flush=True)
  if not args.json:
    print(table(rows))


def table(rows, cols=None):
  """A markdown table of `rows`: `cols` is (header, row key, format) triples; a missing or None
  value shows as '-'."""
  cols = cols or [("layout", "layout", "{}"), ("conv", "conv", "{}"), ("batch", "batch", "{}"),
          ("compile s", "compile_s", "{:.1f}"), ("train step img/s", "train_step_img_s", "{:.0f}"),
          ("train loop img/s", "train_loop_img_s", "{:.0f}"),
          ("loop/step", "loop_vs_step", "{:.2f}"), ("train TFLOP/s", "train_tflops", "{:.3g}"),
          ("infer chunk", "inference_chunk", "{}"), ("infer img/s", "infer_img_s", "{:.0f}"),
          ("torch train", "peer_train_img_s", "{:.0f}"),
          ("torch infer eager", "peer_infer_eager_img_s", "{:.0f}"),
          ("torch infer compiled", "peer_infer_compiled_img_s", "{:.0f}"),
          ("train ratio", "train_ratio", "{:.2f}x"), ("infer ratio", "infer_ratio", "{:.2f}x")]
  cells = [[h for h, _, _ in cols]] + [
      [f.format(r[k]) if r.get(k) is not None else "-" for _, k, f in cols] for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
  lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
  lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
  return "\n".join(lines)


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
