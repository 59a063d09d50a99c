"""The config as a whole: loading a file with its preset, command-line overrides, and the one
`check_config` (a workdir's saved config.json, older ones included: workdirs.py).

Fields are grouped as big_vision groups them (`data`, `input`, `augment`, `model`, `optim`,
`schedule`, `eval`, `checkpoint`, `log`, `distributed`); every field is defined and documented
once, in `configs/cifar.py`'s `base()`, and checked by the module that owns its group.
"""
import ast
import difflib
import importlib.util
import os
import sys

import jax
import ml_collections

from mobilenet_jax import datasets, errors, inference, input_pipeline, models, optimizers
from mobilenet_jax import parallel, profiling, steps
from mobilenet_jax import workdirs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # Where configs/ is.
SCHEMA_FILE = "configs/cifar.py"
NONE_WORDS = ("None", "none", "null")


def schema() -> ml_collections.ConfigDict:
  """The base config: every field, its type, and which take None (SCHEMA_FILE)."""
  return _module(os.path.join(ROOT, SCHEMA_FILE)).base()


def _module(path: str):
  """The config file at `path`; its imports of other config files (`from configs import
  cifar`) resolve from the project's root."""
  if ROOT not in sys.path:
    sys.path.append(ROOT)
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:preset]` (`--config`): the file's `get_config(preset)`, locked."""
  path, _, preset = spec.partition(":")
  if not os.path.isfile(path) and os.path.isfile(os.path.join(ROOT, path)):
    path = os.path.join(ROOT, path)  # configs/cifar.py from any folder.
  if not os.path.isfile(path):
    raise errors.ConfigError(f"--config={spec}: no file {path}; pass a config file such as "
                             "configs/cifar.py[:PRESET].")
  module = _module(path)
  try:
    config = module.get_config(preset) if preset else module.get_config()
  except ValueError as e:
    raise errors.ConfigError(f"--config={spec}: {e}") from e
  config.lock()
  return config


_OVERRIDES: dict[str, str] = {}  # The command line's, as `parse_flags` found them.


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's flags_parser: absl parses all but the `--config.PATH=VALUE` overrides, which
  `from_flags` applies to the `--config` file's config; a bad flag exits with one line."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    argv, overrides = split_overrides(argv)
    _OVERRIDES.clear()
    _OVERRIDES.update(overrides)
    return flags.FLAGS(argv)
  except (errors.UserError, flags.Error) as e:
    fail(e)


def from_flags(default: str | None = None) -> ml_collections.ConfigDict:
  """The `--config` file's config (or `default`'s, without one) with the command line's
  overrides."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return override(load(flags.FLAGS.config or default), _OVERRIDES)


def command_line_overrides() -> dict[str, str]:
  return dict(_OVERRIDES)


def fail(error) -> None:
  """Exits 1 with `error: MESSAGE` on one line (a UserError's message is that line)."""
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(1)


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """argv without its `--config.PATH=VALUE` flags, and those as {PATH: VALUE}."""
  rest, overrides = [], {}
  for arg in argv:
    if arg.startswith("--config."):
      name, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        raise errors.ConfigError(f"{arg}: give a value, as --config.{name}=VALUE.")
      overrides[name] = value
    else:
      rest.append(arg)
  return rest, overrides


def override(config: ml_collections.ConfigDict,
             overrides: dict[str, str]) -> ml_collections.ConfigDict:
  """`config`, each `PATH: VALUE` (command-line text) set in it as the field's type.

  A name is checked against the config's own fields (so a typo is named with the closest
  field); a field the base config leaves unset (None) takes None again as `None`."""
  base = schema()
  for path, text in overrides.items():
    *parents, name = path.split(".")
    node = config
    for key in parents:
      node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or name not in node or isinstance(
        node[name], ml_collections.ConfigDict):
      raise errors.ConfigError(_unknown(config, path))
    node[name] = _parse(path, text, *(_lookup(base, path) or _spec(node, name)))
  return config


def _lookup(config, path: str):
  """`_spec` of `path` in `config`, or None where `config` lacks it."""
  *parents, name = path.split(".")
  for key in parents:
    config = config.get(key)
    if not isinstance(config, ml_collections.ConfigDict):
      return None
  return _spec(config, name) if name in config else None


def _spec(node: ml_collections.ConfigDict, name: str):
  """(type, whether it takes None) of field `name` of `node`: unset fields take None."""
  value = node[name]
  return (node.get_type(name) if value is None else type(value)), value is None


def _parse(path: str, text: str, kind: type, optional: bool):
  """The value of `--config.PATH=text`: None where the field takes it, else of type `kind`."""
  flag = f"--config.{path}={text}"
  if text in NONE_WORDS:
    if optional:
      return None
    raise errors.ConfigError(f"{flag}: this field needs a value (it takes no None).")
  try:
    if kind is str:
      return text
    if kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError
      return text.lower() in ("true", "1")
    if kind in (int, float):
      value = ast.literal_eval(text)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or (
          kind is int and not float(value).is_integer()):
        raise ValueError
      return kind(value)
    value = ast.literal_eval(text)
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
  except (ValueError, SyntaxError):
    raise errors.ConfigError(f"{flag}: expected {'a tuple' if kind is tuple else kind.__name__}"
                             f"{' or None' if optional else ''}.") from None


def _unknown(config, path: str) -> str:
  known = list(_paths(config))
  close = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
  close = close or [p for p in known if p.rsplit(".", 1)[-1] == path.rsplit(".", 1)[-1]]
  hint = f"; did you mean --config.{close[0]}?" if close else ""
  return (f"--config.{path}: no such field{hint} (every field is documented in {SCHEMA_FILE})")


def _paths(config, prefix=""):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _paths(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def with_global_batch(config):
  """`config`, with input.batch_size set from per_process_batch_size (if set) and the process
  count."""
  per_process = config.input.per_process_batch_size
  if per_process is None:
    return config
  if per_process <= 0:
    raise errors.ConfigError(f"config.input.per_process_batch_size={per_process}: must be > 0 "
                             "(or None, to use config.input.batch_size as the global batch).")
  config = config.copy_and_resolve_references()
  config.input.batch_size = per_process * jax.process_count()
  return config


def check_config(config, workdir: str) -> None:
  """Rejects a bad config or workdir with one actionable line, before any data is read: each
  group checked by the module that owns it, then the run's own fields and the workdir."""
  _check_run(config)
  models.check_config(config.model)
  optimizers.check_config(config)
  input_pipeline.check_config(config, jax.device_count())
  steps.check_config(config, jax.device_count())  # Micro-batches of a batch input accepts.
  datasets.check_config(config)
  inference.check_config(config)
  parallel.check_config(config)
  profiling.check_config(config)
  _check_workdir(workdir)


def _check_run(config) -> None:
  def require(ok, message):
    if not ok:
      raise errors.ConfigError(message)
  require(config.mode in ("train", "eval"),
          f"config.mode={config.mode!r}: expected 'train' or 'eval'.")
  require(config.num_epochs > 0, f"config.num_epochs={config.num_epochs}: must be > 0.")
  for path in ("eval.every_epochs", "checkpoint.every_epochs", "checkpoint.keep",
               "checkpoint.every_steps", "log.every_steps"):
    group, name = path.split(".")
    value = config[group][name]
    require(value is None or value >= 1, f"config.{path}={value}: must be >= 1"
            f"{' (or None: off)' if name == 'every_steps' else ''}.")
  require(config.init_from is None or
          workdirs.has_config(config.init_from),
          f"config.init_from={config.init_from}: no config.json there; pass a workdir that "
          "run.py trained or `python -m mobilenet_jax.convert` wrote.")


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: processes of a multi-host run share the workdir.
    probe = os.path.join(workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
    with open(probe, "w", encoding="utf-8"):
      pass
    os.remove(probe)
  except OSError as e:
    raise errors.ConfigError(
        f"--workdir={workdir} is not writable ({e.strerror}): pass a folder "
        "you can write to.") from e
