"""A workdir's files, owned here: the lock of the one run that writes it, their names,
config.json (old ones included), label names, results, the checkpoints' folder, the latest
trained variables, and `init_from`, which starts a new run from a workdir. train, convert,
predict and export all read and write through it; only a lock's holder writes."""
import contextlib
import dataclasses
import datetime
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
import jax
import ml_collections

from mobilenet_jax import checkpoints, errors, inference, metric_logging, models, multihost, steps

CONFIG_FILE = "config.json"          # The run's config (load_config reads older ones too).
LABELS_FILE = "label_names.json"     # The class names, in label order.
RESULTS_FILE = "results.json"        # The final evaluation, speed and size.
METRICS_FILE = metric_logging.METRICS_FILE  # One JSON record per log.
CHECKPOINTS_DIR = "checkpoints"      # Orbax checkpoints, one folder per step (checkpoints.py).
LOCK_FILE = "run.lock"               # Who writes the workdir now (`Lock`).
HEARTBEAT_S = 30     # How often the lock's holder touches it...
STALE_AFTER_S = 300  # ...and how old its last touch may be before another host takes it over.

# Where each field of the flat config (config.json written before 2026-12-05) went.
RENAMES = {
    "dataset": "data.name", "data_dir": "data.dir", "download": "data.download",
    "train_split": "data.train_split", "eval_split": "data.eval_split",
    "train_examples": "data.train_examples", "eval_examples": "data.eval_examples",
    "folder_holdout": "data.folder_holdout", "class_names": "data.class_names",
    "batch_size": "input.batch_size", "per_process_batch_size": "input.per_process_batch_size",
    "input": "input.mode", "input_device_share": "input.device_share",
    "input_workers": "input.workers", "prefetch": "input.prefetch",
    "image_size": "input.image_size", "mean": "input.mean", "std": "input.std",
    "augment": "augment.name", "crop_padding": "augment.crop_padding",
    "alternate_flips": "augment.alternate_flips", "cutout": "augment.cutout",
    "label_smoothing": "augment.label_smoothing",
    "momentum": "optim.momentum", "weight_decay": "optim.weight_decay",
    "learning_rate": "schedule.learning_rate", "lr_boundaries": "schedule.boundaries",
    "lr_values": "schedule.rates", "lr_batch": "schedule.reference_batch",
    "eval_every_epochs": "eval.every_epochs", "eval_flip": "eval.flip",
    "eval_shift": "eval.shift", "eval_crop": "eval.crop", "eval_resize": "eval.resize",
    "inference_chunk": "eval.chunk",
    "checkpoint_every_epochs": "checkpoint.every_epochs", "keep_checkpoints": "checkpoint.keep",
    "progress_bar": "log.progress_bar",
    "distributed": "distributed.enabled",
    "coordinator_address": "distributed.coordinator_address",
    "num_processes": "distributed.num_processes", "process_id": "distributed.process_id",
    "distributed_timeout_s": "distributed.timeout_s",
    "heartbeat_timeout_s": "distributed.heartbeat_timeout_s",
}
# Flat fields added before the grouping, at the values a workdir without them was trained with.
FLAT_ADDED = {"eval_flip": False, "inference_chunk": None, "eval_shift": 0,
              "train_split": "train", "eval_split": "test", "eval_crop": None,
              "eval_resize": "bilinear", "init_from": None, "class_names": None}
MODEL_ADDED = {"kernel_init": "he_normal", "padding": "symmetric", "activation": "relu",
               "bn_momentum": 0.9, "bn_epsilon": 1e-5, "dropout": 0.0}
# Grouped fields added since, likewise: the grouping itself added the step cadences; the
# optimizers, schedules, weight averaging and micro-batches came on 2026-12-04, when every run
# was SGD on a piecewise schedule, without them; the profile and augmentations on 2026-12-05.
ADDED_FIELDS = {"log.profile_steps": None, "augment.randaugment": "",
                "augment.erase_prob": 0.0, "augment.erase_mode": "const",
                "augment.mixup_alpha": 0.0, "augment.cutmix_alpha": 0.0, "augment.mix_prob": 1.0,
                "augment.mix_switch_prob": 0.5, "augment.mix_mode": "batch",
                "ema.decay": 0.0, "ema.num_updates": False, "optim.micro_batches": 1,
                "checkpoint.every_steps": None, "log.every_steps": None,
                "optim.name": "sgd", "optim.nesterov": True, "optim.decay": None,
                "optim.rms_decay": 0.9, "optim.rms_initial": 1.0, "optim.b1": 0.9,
                "optim.b2": 0.999, "optim.epsilon": None, "optim.clip_norm": None,
                "schedule.name": "piecewise", "schedule.final_rate": 0.0,
                "schedule.decay_factor": 0.94, "schedule.decay_epochs": 2.5,
                "schedule.staircase": True, "schedule.warmup_epochs": 0.0}


@dataclasses.dataclass(frozen=True)
class Trained:
  config: ml_collections.ConfigDict
  model: models.MobileNetV1
  variables: dict  # {'params', 'batch_stats'}: the weight average's, unless `raw` or none.
  label_names: tuple[str, ...]
  step: int


def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))


def has_config(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, CONFIG_FILE))


def write_file(workdir: str, name: str, data: str | bytes) -> None:
  """Writes the file whole or not at all: a temporary file, then a rename over the old one."""
  path = os.path.join(workdir, name)
  temporary = f"{path}.tmp.{os.getpid()}"
  try:
    with open(temporary, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())  # Renamed before its data reach the disk, a crash could leave it empty.
    os.replace(temporary, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(temporary)
    raise errors.WorkdirError(f"Could not write {path} ({e.strerror or e}): free space there or "
                              "fix its permissions, then rerun to resume.") from e


class Lock:
  """The workdir's lock: one run writes a workdir at a time; `take` it before writing anything.

  The lock is the file LOCK_FILE, holding the holder's host, pid, start time and a
  random token. It is created by linking a complete temporary file to its name, which
  fails if the name exists: atomic on local disks and on NFS (v2 on), without `flock`,
  which many NFS mounts do not honour. The holder's thread touches the file every
  HEARTBEAT_S. A lock whose holder is gone is taken over: on the same host when its pid
  no longer runs; from another host (a dead node) once the file is STALE_AFTER_S old,
  by this host's clock (clusters keep their clocks within seconds by NTP). A taken-over
  holder that still lives finds its token gone at its next heartbeat and stops at its
  next write (`check`).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.token = uuid.uuid4().hex
    self.lost = None  # Set by the heartbeat: who holds the lock now, if not this run.
    self._stop = threading.Event()
    self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock")

  def take(self) -> "Lock":
    """Takes the lock, or raises WorkdirBusyError naming its holder."""
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "pids": _pid_namespace(),
            "token": self.token, "since": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC")}
    temporary = f"{self.path}.{self.token}"
    with open(temporary, "w", encoding="utf-8") as f:
      json.dump(mine, f)
    try:
      for _ in range(3):  # A holder that leaves or a takeover between two looks: look again.
        with contextlib.suppress(FileExistsError):
          os.link(temporary, self.path)
          self._beat.start()
          return self
        holder = self._holder()
        if holder and not self._gone(holder):
          raise errors.WorkdirBusyError(
              f"{os.path.dirname(self.path)} is in use by another run: pid {holder['pid']} on "
              f"{holder['host']}, since {holder['since']} ({self.path}). Wait for it to end or "
              "stop it, or pass another --workdir. A lock left by a killed run is taken over "
              f"when its pid is gone, from another host after {STALE_AFTER_S} s without a "
              "heartbeat.")
        if holder:
          self._take_over(holder)
      raise errors.WorkdirBusyError(f"{self.path} changed hands three times while this run "
                                    "tried to take it: another run is starting; rerun later.")
    finally:
      os.remove(temporary)

  def _holder(self):
    """The lock file's contents and age, or None once it is gone."""
    try:
      with open(self.path, encoding="utf-8") as f:
        return {**json.load(f), "age_s": time.time() - os.stat(self.path).st_mtime}
    except (FileNotFoundError, json.JSONDecodeError):
      return None

  @staticmethod
  def _gone(holder) -> bool:
    if holder["age_s"] > STALE_AFTER_S:
      return True
    if (holder["host"], holder.get("pids")) != (socket.gethostname(), _pid_namespace()):
      return False  # Another host, or a container on this one: its pids are not ours to see.
    try:
      os.kill(holder["pid"], 0)
    except ProcessLookupError:
      return True
    except PermissionError:  # Another user's process: alive.
      pass
    return False

  def _take_over(self, holder) -> None:
    """Moves the stale lock aside, unless it changed meanwhile (then it goes back)."""
    aside = f"{self.path}.stale.{self.token}"
    with contextlib.suppress(FileNotFoundError):
      os.rename(self.path, aside)
      with open(aside, encoding="utf-8") as f:
        moved = json.load(f)
      if moved["token"] != holder["token"]:  # A new holder's: give it back.
        with contextlib.suppress(FileExistsError):
          os.link(aside, self.path)
      else:
        logging.warning("Took over the lock of pid %s on %s (since %s): that run is gone.",
                        holder["pid"], holder["host"], holder["since"])
      os.remove(aside)

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      holder = self._holder()
      if (not holder or holder["token"] != self.token) and not self._stop.is_set():
        self.lost = holder or {"pid": "?", "host": "(removed)"}
        logging.error("The lock %s was taken over by pid %s on %s: this run stops at its next "
                      "write.", self.path, self.lost["pid"], self.lost["host"])
        return
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def check(self) -> None:
    """Raises unless this run still holds the lock (called before each write)."""
    if self.lost:
      raise errors.WorkdirBusyError(
          f"{self.path} was taken over by pid {self.lost['pid']} on {self.lost['host']} while "
          "this run's heartbeat stalled: stopped so that two runs do not write one workdir.")

  def release(self) -> None:
    self._stop.set()
    self._beat.join()
    holder = self._holder()
    if holder and holder["token"] == self.token:
      os.remove(self.path)


def _pid_namespace() -> str | None:
  """Which pids this process sees: containers that share a host name each have their own."""
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


class _NoLock:
  """A process of a multi-process run other than 0: process 0 holds the run's lock."""

  def check(self) -> None:
    pass


@contextlib.contextmanager
def lock(workdir: str, timeout_s: float = 60):
  """Holds `workdir`'s lock for one run (every process of it: process 0 takes it, and the others
  wait up to `timeout_s` to hear whether it could)."""
  held = multihost.on_process_0(lambda: Lock(workdir).take(), "workdir lock", timeout_s)
  try:
    yield held or _NoLock()
  finally:
    if held:
      held.release()


def write_config(workdir: str, config) -> None:
  write_file(workdir, CONFIG_FILE, config.to_json_best_effort(indent=2))


def save_label_names(workdir: str, label_names) -> None:
  write_file(workdir, LABELS_FILE, json.dumps(list(label_names)))


def write_results(workdir: str, results: dict) -> None:
  write_file(workdir, RESULTS_FILE, json.dumps(results, indent=2))


def trim_metrics(workdir: str, step: int) -> None:
  """Keeps the metrics.jsonl rows up to `step` (where a run resumes): a killed run's later rows,
  and a line it left half-written, go, so that each step has one row, of one run."""
  path = os.path.join(workdir, METRICS_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      rows = metric_logging.complete_records(f.read())
    write_file(workdir, METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows
                                          if row["step"] <= step))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """A workdir's config.json, in today's groups (`upgrade`: older ones too)."""
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not has_config(workdir):
    raise errors.WorkdirError(f"{config_path} does not exist: the workdir must be a folder that "
                              "`python run.py --workdir=...` trained in, or that "
                              "`python -m mobilenet_jax.convert` wrote.")
  with open(config_path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(upgrade(json.load(f)))


def upgrade(saved: dict) -> dict:
  """A config.json's contents in today's groups: a flat one (written before the grouping) is
  moved field by field (RENAMES), with the fields it predates at the values it trained with."""
  if "data" not in saved:
    saved = _group(_flat_upgrade(dict(saved)))
  for path, value in ADDED_FIELDS.items():
    group, name = path.split(".")
    saved.setdefault(group, {}).setdefault(name, value)
  return saved


def _flat_upgrade(flat: dict) -> dict:
  if "lr_values" not in flat:  # Written as decay factors before 2026-12-02.
    rates = [flat["learning_rate"]]
    for decay in flat.pop("lr_decay"):
      rates.append(rates[-1] * decay)
    flat["lr_values"] = rates[1:]
  flat = {**FLAT_ADDED, **flat}
  flat["model"] = {**MODEL_ADDED, **flat["model"]}
  return flat


def _group(flat: dict) -> dict:
  grouped = {}
  for key, value in flat.items():
    group, _, name = RENAMES.get(key, key).rpartition(".")
    (grouped.setdefault(group, {}) if group else grouped)[name] = value
  return grouped


def restore_trained(workdir: str, config):
  """The latest TrainState of a trained workdir, for evaluation and inference (none: an error)."""
  directory = checkpoint_dir(workdir)
  train_first = f"train first with `.venv/bin/python run.py --config=... --workdir={workdir}`."
  if not os.path.isdir(directory):  # Checkpointer would create it.
    raise errors.WorkdirError(f"No {CHECKPOINTS_DIR}/ in {workdir}: {train_first}")
  checkpointer = checkpoints.Checkpointer(directory, config.checkpoint.keep)
  try:
    if checkpointer.latest_step() is None:
      raise errors.WorkdirError(f"No checkpoint in {directory}: {train_first}")
    return checkpointer.restore(checkpoints.state_template(config))
  finally:
    checkpointer.close()


# predict, export and convert --out: the flag that picks the raw weights over their average.
RAW_FLAG_HELP = ("Use the trained weights themselves, not their moving average (config.ema), "
                 "which is used when the workdir has one.")


def load(workdir: str, raw: bool = False) -> Trained:
  """Restores the latest checkpoint of a `run.py` workdir with the config saved beside it:
  its weight average (config.ema) if it has one and not `raw`, else its weights."""
  config = load_config(workdir)
  state = restore_trained(workdir, config)
  with open(os.path.join(workdir, LABELS_FILE), encoding="utf-8") as f:
    label_names = tuple(json.load(f))
  if state.ema is not None and not raw:
    state = steps.averaged(state)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return Trained(config, models.create_model(config.model), variables, label_names,
                 int(state.step))


# The layout fields a model's weights are tied to: init_from requires the same.
LAYOUT_FIELDS = ("alpha", "stem_stride", "shallow", "use_bias", "padding", "activation",
                 "bn_epsilon")


def start_from(state, config):
  """`state` with the params and BatchNorm statistics of `config.init_from`'s latest checkpoint
  (its weight average, if it kept one); this run's average, if kept, starts from them.

  The layout (LAYOUT_FIELDS, input normalization) must be the same: weights do not carry over
  between paddings or activations. A head of another class count keeps its fresh init.
  """
  source = load(config.init_from)
  differ = [f"--config.model.{k}={source.config.model[k]!r}" for k in LAYOUT_FIELDS
            if source.config.model[k] != config.model[k]]
  differ += [f"--config.input.{k}='{tuple(source.config.input[k])}'" for k in ("mean", "std")
             if tuple(source.config.input[k]) != tuple(config.input[k])]
  if differ:
    raise errors.ConfigError(
        f"config.init_from={config.init_from} holds a model of another layout: "
        f"pass {' '.join(differ)} (or the preset it was trained or converted with).")
  params = dict(source.variables["params"])
  theirs, ours = params["head"]["kernel"].shape, state.params["head"]["kernel"].shape
  if theirs != ours:
    params["head"] = state.params["head"]
    logging.info("Starting from %s (step %d); its head (%d classes) is replaced by a new one "
                 "for %d classes.", config.init_from, source.step, theirs[-1], ours[-1])
  else:
    logging.info("Starting from %s (step %d).", config.init_from, source.step)
  return steps.with_weights(state, params, source.variables["batch_stats"])


def logits_fn(trained: Trained):
  """A jitted function: uint8 images (n, h, w, 3) of any size -> logits, computed as in eval."""
  return jax.jit(lambda images: inference.eval_logits(
      trained.model.apply, trained.variables, images, trained.config,
      inference.Views.of(trained.config)))
