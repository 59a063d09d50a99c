"""run.py's bad settings: one line naming the flag and the fix, no traceback, within seconds."""
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, run_mocked

pytestmark = pytest.mark.slow  # Trains, or launches processes: `-m 'not slow'` skips it.

BAD_FLAGS = {  # flags -> what the one line must say
    "negative lr": (["--config.schedule.learning_rate=-0.1"],
                    "config.schedule.learning_rate=-0.1: must be > 0"),
    "batch 0": (["--config.input.batch_size=0"],
                "config.input.batch_size=0 must be a positive multiple"),
    "alpha 0": (["--config.model.alpha=0"], "config.model.alpha=0.0: must be > 0"),
    "unknown parallel": (["--config.parallel=dp"], "config.parallel='dp': expected one of"),
    "image_size 4": (["--config.input.image_size=4"], "config.input.image_size=4: must be >= 8"),
    "unknown preset": (["--config=configs/cifar.py:fast"], "Unknown preset 'fast' in configs/"),
    "field typo": (["--config.num_epoch=1"],
                   "--config.num_epoch: no such field; did you mean --config.num_epochs?"),
    "nested typo": (["--config.model.alfa=1"],
                    "--config.model.alfa: no such field; did you mean --config.model.alpha?"),
    "flat name": (["--config.batch_size=8"], "did you mean --config.input.batch_size?"),
    "None for a value": (["--config.num_epochs=None"], "needs a value (it takes no None)"),
    "wrong type": (["--config.seed=x"], "--config.seed=x: expected int."),
    "no value": (["--config.seed"], "--config.seed: give a value, as --config.seed=VALUE."),
    "missing config file": (["--config=configs/cifar10.py"], "no file configs/cifar10.py"),
}


def _one_error_line(result, expected):
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, last


def test_each_bad_setting_is_one_line_before_anything_loads(tmp_path):
  env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "no_data")}  # Reading would fail too.
  procs = {}
  for name, (flags, _) in BAD_FLAGS.items():
    config = [] if any(f.startswith("--config=") for f in flags) else ["--config=configs/cifar.py"]
    procs[name] = subprocess.Popen(
        [sys.executable, "run.py", *config, *flags, f"--workdir={tmp_path / 'run'}"], cwd=ROOT,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    _one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err),
                    BAD_FLAGS[name][1])
  assert not (tmp_path / "no_data").exists()


def test_a_missing_dataset_offline_fails_within_seconds_and_leaves_nothing(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  start = time.time()
  result = subprocess.run([sys.executable, "run.py", "--config=configs/cifar.py:smoke",
                           f"--config.data.dir={data_dir}", "--config.data.download=True",
                           f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  _one_error_line(result, f"Dataset 'cifar10' is not prepared in {data_dir}")
  assert "cannot be reached" in result.stderr or "downloading it failed" in result.stderr
  assert time.time() - start < 60
  assert not os.listdir(data_dir)  # No downloads/ or incomplete.* folders.


def test_eval_reads_the_workdirs_config_and_a_bad_override_is_one_line(trained_workdir,
                                                                        tmp_path):
  workdir = str(trained_workdir)
  # Another preset on the command line: the workdir's config.json decides the model.
  result = run_mocked("--config=configs/cifar.py:torch", "--config.mode=eval",
                      f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  trained = json.loads((trained_workdir / "results.json").read_text())
  for weights, name in (("", ""), ("ema_", "weight average (config.ema): ")):  # As trained.
    assert (f"step 8: {name}test accuracy {trained[f'{weights}test_accuracy']:.4f} (top-5 "
            f"{trained[f'{weights}test_top5_accuracy']:.4f}) on 40 examples") in result.stdout
  # The per-class table: the weight average's, as trained (its matrix: numpy's in test_steps).
  confusion = np.asarray(trained["ema_test_confusion"])
  names = json.loads((trained_workdir / "label_names.json").read_text())
  for name, hits, count in zip(names, np.diag(confusion), confusion.sum(1)):
    accuracy = f"{hits / count:.2%}" if count else "-"
    assert re.search(rf"^{name} +{re.escape(accuracy)} +{count} ", result.stdout, re.M), name
  result = run_mocked("--config=configs/cifar.py", "--config.mode=eval",
                      "--config.model.alpha=0.5", f"--workdir={workdir}")
  _one_error_line(result, "does not fit the configured model")
  assert len(result.stderr) < 5000
  result = run_mocked("--config=configs/cifar.py", "--config.mode=eval",
                      f"--workdir={tmp_path / 'never_trained'}")
  _one_error_line(result, "config.json does not exist")
  assert not (tmp_path / "never_trained").exists()
