"""Model structure: exact parameter counts, the paper's tables, shapes, dtypes, depthwise impls."""
import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from mobilenet_jax import convolutions, models, summary


def model_config(**overrides):
  """The default preset's model (the Keras layout), without conv biases unless overridden."""
  from configs import cifar  # pylint: disable=g-import-not-at-top
  c = cifar.get_config().model
  c.use_bias = False
  c.update(overrides)
  return c


def count(image_size=32, **overrides):
  return summary.summarize(models.create_model(model_config(**overrides)), image_size)


def test_pytorch_cifar_layout_has_exactly_3217226_params():
  assert count(stem_stride=1, use_bias=False).params == 3_217_226


def test_keras_cifar_layout_has_exactly_3228170_params():
  assert count(stem_stride=2, use_bias=True).params == 3_228_170


def test_summary_params_equal_the_initialized_parameter_tree():
  model = models.create_model(model_config(alpha=0.5, shallow=True, use_bias=True))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                train=False))
  leaves = jax.tree.leaves(variables["params"])
  assert summary.summarize(model, 32).params == sum(x.size for x in leaves)


# Howard et al. 2017, Table 6 (width multiplier) and Table 7 (resolution), ImageNet, 1000 classes:
# (alpha, resolution, million mult-adds, million params).
PAPER = [(1.0, 224, 569, 4.2), (0.75, 224, 325, 2.6), (0.5, 224, 149, 1.3), (0.25, 224, 41, 0.5),
         (1.0, 192, 418, 4.2), (1.0, 160, 290, 4.2), (1.0, 128, 186, 4.2)]


def within(value, paper_millions, decimals):
  """Within 1% of the paper, or within the rounding of its printed figure if that is looser."""
  tolerance = max(0.01 * paper_millions, 0.5 * 10 ** -decimals) * 1e6
  return abs(value - paper_millions * 1e6) <= tolerance


@pytest.mark.parametrize("alpha,size,macs,params", PAPER)
def test_imagenet_configuration_matches_paper_tables(alpha, size, macs, params):
  s = count(image_size=size, alpha=alpha, num_classes=1000, stem_stride=2, use_bias=False)
  assert within(s.macs, macs, 0), (s.macs, macs)
  assert within(s.params, params, 1), (s.params, params)


def test_one_point_zero_224_is_within_one_percent_strictly():
  s = count(image_size=224, num_classes=1000)
  assert abs(s.macs - 569e6) / 569e6 < 0.01 and abs(s.params - 4.2e6) / 4.2e6 < 0.01


@pytest.mark.parametrize("size,strides,expected", [(16, 1, 16), (16, 2, 8), (15, 2, 8), (7, 1, 7),
                                                   (9, 2, 5)])
def test_block_output_shapes(size, strides, expected):
  block = models.DepthwiseSeparable(24, *models.conv_and_norm(train=False), strides=strides)
  x = jnp.ones((2, size, size, 8))
  y, _ = jax.jit(lambda x: block.init_with_output(jax.random.key(0), x))(x)
  assert y.shape == (2, expected, expected, 24)


@pytest.mark.parametrize("alpha,stem,shallow,size,classes", [
    (1.0, 2, False, 32, 10), (0.5, 1, False, 24, 100), (0.25, 2, True, 40, 10),
    (0.75, 1, True, 32, 7), (0.25, 2, False, 224, 1000)])
def test_logits_shape(alpha, stem, shallow, size, classes):
  model = models.create_model(model_config(alpha=alpha, stem_stride=stem, shallow=shallow,
                                           num_classes=classes))
  logits = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False)[0],
                          jnp.ones((3, size, size, 3)))
  assert logits.shape == (3, classes) and logits.dtype == jnp.float32


def test_shallow_drops_the_five_512_blocks():
  deep, shallow = count(), count(shallow=True)
  dropped = 5 * (3 * 3 * 512 + 2 * 512 + 512 * 512 + 2 * 512)
  assert deep.params - shallow.params == dropped


def test_bfloat16_runs_and_stays_close_to_float32():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  f32 = models.create_model(model_config(alpha=0.25))
  variables = jax.jit(lambda x: f32.init(jax.random.key(0), x, train=False))(x)
  bf16 = models.create_model(model_config(alpha=0.25, dtype="bfloat16"))
  out, _ = jax.jit(lambda v, x: bf16.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  infer = lambda model: jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  out, ref = infer(bf16), infer(f32)
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))


def _layers(impl):
  return models.conv_and_norm(train=False, use_bias=True, conv_impl=impl)


def _outputs_and_gradients(make, x):
  """Value and (params, input) gradients of a fixed projection of `make(impl)`'s output."""
  variables = make("lax").init(jax.random.key(1), x)
  def loss(impl, params, x):
    y = make(impl).apply({**variables, "params": params}, x)
    return jnp.sum(y * jnp.arange(y.size).reshape(y.shape) / y.size)
  return {impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1)))(
      variables["params"], x) for impl in ("lax", "shifted")}


def _assert_same(results):
  ref, got = results["lax"], results["shifted"]
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size,strides", [(8, 1), (8, 2), (7, 1), (7, 2), (9, 2), (2, 2), (1, 1)])
def test_shifted_depthwise_matches_grouped_conv_outputs_and_gradients(size, strides):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
  make = lambda impl: models.ConvBNReLU(6, 3, *_layers(impl), strides=strides, groups=6)
  _assert_same(_outputs_and_gradients(make, x))


@pytest.mark.parametrize("kernel,size,strides", [(3, 8, 1), (3, 9, 2), (1, 7, 1), (3, 8, 2)])
def test_shifted_dense_conv_matches_lax_outputs_and_gradients(kernel, size, strides):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  make = lambda impl: models.ConvBNReLU(5, kernel, *_layers(impl), strides=strides)
  _assert_same(_outputs_and_gradients(make, x))


def test_whole_model_agrees_across_implementations():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  outs = {}
  for impl in ("lax", "shifted"):
    model = models.create_model(model_config(alpha=0.25, conv=impl, stem_stride=1))
    variables = jax.jit(lambda x, m=model: m.init(jax.random.key(0), x, train=False))(x)
    outs[impl] = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))(variables, x)
  np.testing.assert_allclose(outs["shifted"], outs["lax"], rtol=1e-4, atol=1e-5)


def test_implementations_share_one_parameter_tree():
  x = jnp.ones((1, 32, 32, 3))
  init = lambda impl: models.create_model(model_config(conv=impl)).init(
      jax.random.key(0), x, train=False)
  trees = [jax.tree.map(jnp.shape, jax.eval_shape(lambda i=impl: init(i)))
           for impl in ("lax", "shifted")]
  assert trees[0] == trees[1]
  assert trees[0]["params"]["block1"]["depthwise"]["conv"]["kernel"] == (3, 3, 1, 32)


@pytest.mark.parametrize("init,variance", [("he_normal", 2.0), ("torch", 1 / 3)])
def test_conv_kernels_start_with_the_named_variance_times_one_over_fan_in(init, variance):
  model = models.create_model(model_config(kernel_init=init))
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                         train=False))()
  kernel = variables["params"]["block13"]["pointwise"]["conv"]["kernel"]  # fan_in 1024, 1M weights
  np.testing.assert_allclose(np.var(kernel) * 1024, variance, rtol=0.02)
  # init_variables compiles at -O1 on a CPU: the same bits as the default compile above.
  for x, y in zip(jax.tree.leaves(variables),
                  jax.tree.leaves(models.init_variables(model, jax.random.key(0), 32))):
    np.testing.assert_array_equal(x, y)


def test_auto_picks_shifted_on_cpu_and_lax_on_accelerators():
  assert convolutions.resolve("auto", "cpu") == "shifted"
  assert convolutions.resolve("auto", "gpu") == "lax"
  assert convolutions.resolve("auto", "tpu") == "lax"


@pytest.mark.parametrize("field,value", [("alpha", 0.0), ("stem_stride", 3), ("conv", "fast"),
                                         ("dtype", "float16"), ("kernel_init", "xavier"),
                                         ("padding", "valid"), ("activation", "gelu"),
                                         ("bn_momentum", 1.0), ("bn_epsilon", 0.0)])
def test_bad_model_config_is_rejected_by_name(field, value):
  with pytest.raises(ValueError, match=f"config.model.{field}"):
    models.create_model(model_config(**{field: value}))


@pytest.mark.slow
def test_summary_cli_prints_table_then_params_and_macs():
  out = subprocess.run([sys.executable, "-m", "mobilenet_jax.summary",
                        "--config=configs/cifar.py:torch", "--config.model.alpha=0.5"],
                       cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
  expected = count(stem_stride=1, alpha=0.5)
  assert out[-2:] == [f"params: {expected.params}", f"macs: {expected.macs}"]
  assert any(line.startswith("block13/pointwise/conv") for line in out)


@pytest.mark.parametrize("stem_stride, alpha, shallow, image_size, dtype", [
    (1, 1.0, False, 32, "float32"), (2, 1.5, True, 32, "float32"), (2, 0.25, False, 40, "float32"),
    (1, 0.75, True, 24, "bfloat16"), (2, 1.0, False, 224, "float32")])
def test_largest_activation_is_the_largest_layer_output(stem_stride, alpha, shallow, image_size,
                                                          dtype):
  config = ml_collections.ConfigDict({"stem_stride": stem_stride, "alpha": alpha, "dtype": dtype})
  model = models.MobileNetV1(alpha=alpha, stem_stride=stem_stride, shallow=shallow)
  layers = summary.summarize(model, image_size).layers
  largest = max(np.prod(layer.output_shape) for layer in layers)
  itemsize = jnp.dtype(models.DTYPES[dtype]).itemsize
  assert models.largest_activation_bytes(config, image_size) == largest * itemsize
