r"""Parameter count, multiply-accumulates (MACs) and a per-layer table, like Keras' summary().

  python -m mobilenet_jax.summary --config=configs/cifar.py:torch [--config.model.alpha=0.5]

prints the table, then `params: <int>` and `macs: <int>` as its last two lines.
MACs count the multiply-adds of every convolution and the dense head for one
image (the paper's "Mult-Adds"); BatchNorm, ReLU and pooling are not counted.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layer:
  name: str
  kind: str
  output_shape: tuple[int, ...]
  params: int
  macs: int


@dataclasses.dataclass(frozen=True)
class Summary:
  layers: tuple[Layer, ...]

  @property
  def params(self) -> int:
    return sum(l.params for l in self.layers)

  @property
  def macs(self) -> int:
    return sum(l.macs for l in self.layers)

  def table(self) -> str:
    rows = [("layer", "type", "output shape", "params", "MACs")]
    rows += [(l.name, l.kind, "x".join(map(str, l.output_shape)), f"{l.params:,}", f"{l.macs:,}")
             for l in self.layers]
    rows.append(("total", "", "", f"{self.params:,}", f"{self.macs:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths)))
    rule = "-" * len(fmt(rows[0]))
    return "\n".join([fmt(rows[0]), rule, *map(fmt, rows[1:-1]), rule, fmt(rows[-1])])


def summarize(model: nn.Module, image_size: int) -> Summary:
  """Traces `model` on one image (shapes only, no compute) and records every layer."""
  layers = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(
        module, (nn.Conv, nn.Dense, nn.BatchNorm)):
      return out
    params = module.variables.get("params", {})
    count = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
    macs = 0
    if not isinstance(module, nn.BatchNorm):  # kernel (..., in / groups, out): one MAC per weight.
      kernel = params["kernel"].shape
      macs = int(np.prod(out.shape[1:-1]) * np.prod(kernel))
    layers.append(Layer("/".join(module.path), type(module).__name__, tuple(out.shape[1:]),
                        count, macs))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)),
                                      train=False))
  return Summary(tuple(layers))


def main(argv):
  from mobilenet_jax import config_lib, errors, models  # pylint: disable=g-import-not-at-top
  del argv
  try:
    config = config_lib.from_flags()
  except errors.UserError as e:
    config_lib.fail(e)
  summary = summarize(models.create_model(config.model), config.input.image_size)
  print(summary.table())
  print(f"params: {summary.params}")
  print(f"macs: {summary.macs}")


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from mobilenet_jax import config_lib  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("config", None, "Config file, e.g. configs/cifar.py:torch; "
                      "--config.FIELD=VALUE overrides a field.", required=True)
  app.run(main, flags_parser=config_lib.parse_flags)
