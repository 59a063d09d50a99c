r"""One command for a machine with an accelerator: tests, speed beside PyTorch, a CIFAR-10 run.

Writes `device_check.json` and `device_check.md` (the tables that docs/gpu.md collects) to --out:
1. tests: the test files that need no TensorFlow or tfds (`TESTS`: the model, its steps,
   sampler, inference, configs, arrays datasets, benchmarks), run there by pytest;
2. throughput (benchmarks/throughput.py's step, loop and inference timings) over `--grid`: both
   layouts, float32 and bfloat16, `lax` and `shifted` convolutions, batch 128 and 512, jit and
   pmap, each row with its TFLOP/s and their share of the card's peak (`PEAK_TFLOPS`), beside
   the PyTorch peer (benchmarks/torch_peer.py) on the same device and batch: eager,
   channels-last, and channels-last with torch.compile, under bf16 autocast for bfloat16 rows;
3. train: the default recipe (configs/cifar.py) on `--dataset` (an npz: dataset: the machine
   has no TensorFlow to read tfds with) until `--train_minutes` have passed, then its last
   epoch's test accuracy and images/s.
Each part stops starting rows once `--minutes` (for the whole check) are spent; what was
skipped is listed, so the files are always written. `--cpu` runs every part at toy sizes (a
test does, in CI, with TensorFlow and tfds blocked from import).

On the GPU machine (NVIDIA H200, JAX 0.11, no TensorFlow, tfds or ml_collections, no network,
64 MiB per call; the device tool's README). Here, once:

  echo /.whl/ >> .git/info/exclude; echo /.data/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
      ml_collections==1.1.0
  .venv/bin/python -m mobilenet_jax.arrays --config=configs/cifar.py \
      --config.data.dir=../shared/tensorflow_datasets --out=.data/cifar10 --chunk_mb=62

CIFAR-10 as uint8 is 184 MB: three chunks of <= 62 MB, one per call. The machine keeps the
repository's ignored files while it stays warm (30 s after a call), so call `run` three times
back to back, each carrying one chunk (and `.whl`); the first two run only `true`, the third:

  carry: [".whl", ".data/cifar10/cifar10-00002-of-00003.npz"], timeout_s: 600
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && \
  python3 benchmarks/device_check.py --out=$OUT --dataset=npz:.data/cifar10

`--minutes` (8.5) bounds the whole check: the tests get at most a third of it, throughput rows
start while more than a minute is left beyond `--train_minutes` (3), and training takes the
rest; rows left out are listed. If a chunk did not arrive, the reader names the missing one and
the train part records that error; the other parts still run. `--parts throughput` (or
`tests`, `train`) runs one part, e.g. to spend a second session's minutes on the rest.
"""
import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# JAX takes 75% of a GPU's memory at its first use by default: with the check's own process,
# the test workers and the PyTorch peer on one card, each takes what it uses instead.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=g-import-not-at-top

from benchmarks import throughput  # pylint: disable=g-import-not-at-top
from configs import cifar  # pylint: disable=g-import-not-at-top
from mobilenet_jax import train, workdirs  # pylint: disable=g-import-not-at-top

TESTS = ("tests/test_arrays.py", "tests/test_configs.py", "tests/test_inference.py",
         "tests/test_models.py", "tests/test_plots.py", "tests/test_sampler.py",
         "tests/test_steps.py", "tests/test_throughput.py")
# Dense tensor-core peaks (NVIDIA's datasheets): float32 rows at TF32's, which JAX's default
# precision and PyTorch's cuDNN convolutions use on these cards.
PEAK_TFLOPS = {"H200": {"float32": 494.7, "bfloat16": 989.4},
               "H100": {"float32": 494.7, "bfloat16": 989.4},
               "A100": {"float32": 156.0, "bfloat16": 312.0}}
# (layout, dtype, conv, batch, parallel), the most wanted first: what a budget cuts is the end.
GPU_GRID = tuple((layout, dtype, "lax", batch, "jit") for batch in (128, 512)
                 for layout in ("keras", "torch") for dtype in ("bfloat16", "float32")) + (
    ("keras", "bfloat16", "lax", 128, "pmap"), ("keras", "float32", "shifted", 128, "jit"),
    ("torch", "float32", "shifted", 128, "jit"))
# At test_throughput's size, so that a test session compiles its step and inference once.
CPU_GRID = (("keras", "float32", "shifted", 8, "pmap"),)
# The peer's modes; torch.compile (~1 minute a configuration) at the recipes' batch only.
PEER_MODES = {"gpu": ("eager", "channels_last"), "cpu": ("eager", "channels_last")}
COMPILED_BATCHES = {"gpu": (128,), "cpu": ()}


class Clock:
  """The check's time budget: each part asks before starting another row."""

  def __init__(self, minutes: float):
    self.deadline = time.time() + 60 * minutes

  def left_s(self) -> float:
    return self.deadline - time.time()


def run_tests(files, out: pathlib.Path, clock: Clock) -> dict:
  """pytest on `files` (one worker per 4 cores, at most 4); counts and the failures' names."""
  xml = out / "tests.xml"
  workers = max(0, min(4, (os.cpu_count() or 1) // 4))
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"-n{workers}",
         f"--junitxml={xml}", *files]
  try:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False,
                            timeout=max(30, clock.left_s() / 3))
  except subprocess.TimeoutExpired:
    return {"files": list(files), "error": "timed out"}
  if not xml.exists():
    return {"files": list(files), "error": result.stdout[-2000:] + result.stderr[-2000:]}
  suite = ET.parse(xml).getroot().find("testsuite")
  failed = []
  for case in suite.iter("testcase"):
    problem = case.find("failure") if case.find("failure") is not None else case.find("error")
    if problem is not None:
      module = case.get("classname").rsplit(".", 1)[-1]  # Its prefix depends on the rootdir.
      failed.append(f"{module}.{case.get('name')}: "
                    f"{problem.get('message', '')[:300]}")
  return {"files": list(files), "tests": int(suite.get("tests")),
          "failed": int(suite.get("failures")) + int(suite.get("errors")),
          "skipped": int(suite.get("skipped")), "failures": failed,
          "summary": result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""}


def _peak(dtype: str):
  kind = jax.devices()[0].device_kind
  return next((p[dtype] for name, p in PEAK_TFLOPS.items() if name in kind), None)


def _peer(layout, dtype, batch, alpha, cpu: bool, clock: Clock) -> dict:
  """The PyTorch peer's rates per mode for one configuration ({} without torch or time)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"error": "torch is not installed"}
  device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
  kind = "cpu" if cpu else "gpu"
  modes = PEER_MODES[kind] + (("compiled",) if batch in COMPILED_BATCHES[kind] else ())
  try:
    peer = throughput.run_peer(layout, batch, alpha, dtype, 2 if cpu else 20, modes,
                               "--device", device, "--repeats", "1" if cpu else "3",
                               timeout=max(10, min(240, clock.left_s())))
  except subprocess.TimeoutExpired:
    return {"error": "timed out"}
  except subprocess.CalledProcessError as e:
    return {"error": e.stderr.strip().splitlines()[-1] if e.stderr.strip() else "?"}
  return {"device": device, "torch": peer["torch"], **peer["rates"]}


def run_throughput(grid, alpha: float, cpu: bool, clock: Clock, reserve_s: float) -> dict:
  """A row per grid entry (JAX's figures, TFLOP/s, share of peak), and the peer's per
  (layout, dtype, batch), each run once; no row starts with under a minute left beyond
  `reserve_s` (the training part's)."""
  rows, peers, skipped = [], {}, []
  for layout, dtype, conv, batch, parallel in grid:
    if clock.left_s() - reserve_s < 60:
      skipped.append([layout, dtype, conv, batch, parallel])
      continue
    args = argparse.Namespace(batch=batch, alpha=alpha, dtype=dtype, parallel=parallel,
                              inference_chunk=None, steps=2 if cpu else 20,
                              repeats=1 if cpu else 3, free_depthwise=False,
                              free_depthwise_and_norm=False)
    row = throughput.measure(args, layout, conv)
    peak = _peak(dtype)
    row["peak_tflops"] = peak
    row["train_share_of_peak"] = row["train_tflops"] / peak if peak else None
    key = f"{layout}/{dtype}/{batch}"
    if key not in peers:
      peers[key] = _peer(layout, dtype, batch, alpha, cpu, clock)
    for mode, rates in peers[key].items():
      if isinstance(rates, dict):
        row[f"torch_{mode}_train_img_s"] = rates["train_img_s"]
        row[f"torch_{mode}_infer_img_s"] = rates["infer_img_s"]
    rows.append(row)
  return {"rows": rows, "peer": peers, "skipped": skipped}


def run_training(dataset: str, minutes: float, cpu: bool, workdir: pathlib.Path) -> dict:
  """The default recipe (the smoke preset with --cpu) on `dataset`, stopped after `minutes`
  as a preemption is (SIGTERM: a checkpoint, then return); its last epoch's figures."""
  config = cifar.get_config("smoke" if cpu else "")
  config.data.update(name=dataset, download=False)
  config.log.progress_bar = False
  workdir.mkdir(parents=True, exist_ok=True)
  # A SIGTERM after the run restored the handler it found must not kill the check.
  signal.signal(signal.SIGTERM, lambda *_: None)
  timer = threading.Timer(60 * minutes, os.kill, (os.getpid(), signal.SIGTERM))
  timer.start()
  start = time.time()
  try:
    results = train.train_and_evaluate(config, str(workdir))
  except Exception as e:  # pylint: disable=broad-except
    return {"dataset": dataset, "error": f"{type(e).__name__}: {e}"}
  finally:
    timer.cancel()
  with open(workdir / workdirs.METRICS_FILE, encoding="utf-8") as f:
    epochs = [json.loads(line) for line in f]
  last = epochs[-1] if epochs else {}
  return {"dataset": dataset, "preset": "smoke" if cpu else "default", "epochs": len(epochs),
          "of_epochs": config.num_epochs, "finished": bool(results),
          "test_accuracy": last.get("test_accuracy"),
          "train_images_per_s": last.get("train_images_per_s"),
          "wall_s": time.time() - start}


def environment() -> dict:
  versions = {}
  for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "numpy"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  device = jax.devices()[0]
  return {"date": datetime.date.today().isoformat(), "backend": jax.default_backend(),
          "device_kind": device.device_kind, "devices": jax.device_count(),
          "versions": versions}


def markdown(report: dict) -> str:
  env = report["environment"]
  lines = [f"# device_check: {env['device_kind']} x{env['devices']} ({env['backend']}), "
           f"{env['date']}", "",
           "versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v), ""]
  tests = report.get("tests")
  if tests:
    lines += [f"tests ({', '.join(tests['files'])}): " + (
        tests.get("error") or f"{tests['tests']} run, {tests['failed']} failed, "
        f"{tests['skipped']} skipped"), *[f"- {f}" for f in tests.get("failures", [])], ""]
  speed = report.get("throughput")
  if speed:
    cols = [("layout", "layout", "{}"), ("dtype", "dtype", "{}"), ("conv", "conv", "{}"),
            ("batch", "batch", "{}"), ("parallel", "parallel", "{}"),
            ("compile s", "compile_s", "{:.1f}"), ("step img/s", "train_step_img_s", "{:.0f}"),
            ("loop img/s", "train_loop_img_s", "{:.0f}"), ("infer img/s", "infer_img_s", "{:.0f}"),
            ("train TFLOP/s", "train_tflops", "{:.3g}"),
            ("% of peak", "train_share_of_peak", "{:.1%}"),
            ("torch eager train", "torch_eager_train_img_s", "{:.0f}"),
            ("torch NHWC train", "torch_channels_last_train_img_s", "{:.0f}"),
            ("torch compiled train", "torch_compiled_train_img_s", "{:.0f}"),
            ("torch eager infer", "torch_eager_infer_img_s", "{:.0f}"),
            ("torch compiled infer", "torch_compiled_infer_img_s", "{:.0f}")]
    lines.append(throughput.table(speed["rows"], cols))
    errors = {k: v["error"] for k, v in speed["peer"].items() if "error" in v}
    lines += [""] + [f"peer {k}: {e}" for k, e in errors.items()]
    if speed["skipped"]:
      lines += [f"skipped (time): {speed['skipped']}"]
    lines += [""]
  run = report.get("train")
  if run:
    lines += ["train: " + (run.get("error") or (
        f"{run['preset']} recipe on {run['dataset']}: {run['epochs']} of {run['of_epochs']} "
        f"epochs in {run['wall_s']:.0f} s, test accuracy {run['test_accuracy']:.4f}, "
        f"{run['train_images_per_s']:.0f} training images/s")), ""]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, type=pathlib.Path)
  p.add_argument("--parts", nargs="+", default=["tests", "throughput", "train"],
                 choices=("tests", "throughput", "train"))
  p.add_argument("--dataset", default="npz:.data/cifar10", help="the train part's dataset")
  p.add_argument("--minutes", type=float, default=8.5, help="the whole check's budget")
  p.add_argument("--train_minutes", type=float, default=3.0)
  p.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("/tmp/device_check_cifar"),
                 help="the train part's workdir: a later call on the same machine resumes it")
  p.add_argument("--tests", nargs="+", default=list(TESTS))
  p.add_argument("--cpu", action="store_true", help="toy sizes, for a test of this script")
  args = p.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  clock = Clock(args.minutes)
  report = {"environment": environment(), "command": sys.argv}
  if "tests" in args.parts:
    report["tests"] = run_tests(args.tests, args.out, clock)
  if "throughput" in args.parts:
    reserve_s = 60 * args.train_minutes + 30 if "train" in args.parts else 0
    report["throughput"] = run_throughput(CPU_GRID if args.cpu else GPU_GRID,
                                          0.25 if args.cpu else 1.0, args.cpu, clock, reserve_s)
  if "train" in args.parts:
    minutes = min(args.train_minutes, max(0.5, clock.left_s() / 60 - 0.5))
    report["train"] = run_training(args.dataset, minutes, args.cpu, args.workdir)
  (args.out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
  (args.out / "device_check.md").write_text(markdown(report))
  print(markdown(report))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
