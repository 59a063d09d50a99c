r"""MobileNetV1 at ImageNet's 224x224 in the layouts of the public pretrained checkpoints.

  python -m mobilenet_jax.convert --format=keras_app --alpha=1.0 --image_size=224 \
      --workdir=workdirs/keras_1.0_224                  # the config: configs/imagenet.py:keras
  python -m mobilenet_jax.convert --format=timm --file=model.safetensors \
      --workdir=workdirs/timm                           # the config: configs/imagenet.py:timm
  python run.py --config=configs/imagenet.py:keras,cifar10 --config.model.alpha=0.25 \
      --config.image_size=128 --config.init_from=workdirs/keras_0.25_128 --workdir=...

Presets (`:keras` or `:timm`, optionally `,cifar10`):
- keras: Keras applications' `MobileNet` (70.4% top-1 at 1.0-224 by keras.io): ReLU6, TensorFlow
  padding, Keras' BatchNorm, dropout 1e-3 before the head; `alpha` 0.25/0.5/0.75/1.0 and
  `image_size` 128/160/192/224 select one of its 16 checkpoints.
- timm: timm's `mobilenetv1_100` (75.4% top-1 at 224 by timm's results table): ReLU6,
  PyTorch's padding and BatchNorm.
Both take pixels scaled to [-1, 1], and predict fits an image as both evaluate: its shorter side
resized to image_size / 0.875 (Keras: bilinear, timm: bicubic), then the centre crop.
- `,cifar10`: fine-tunes that layout on CIFAR-10 (10 classes, a new head, `init_from` a converted
  workdir): 5 epochs, 0.01 for 3 then 0.001, CIFAR's translation and flip before the upscale.

Training on ImageNet itself needs a pipeline that streams it: the device pipeline reads a whole
split into memory, so these presets are for converted checkpoints and fine-tuning.
"""
import ml_collections

from configs import cifar

LAYOUTS = {
    "keras": {"activation": "relu6", "padding": "same", "bn_momentum": 0.99, "bn_epsilon": 1e-3,
              "dropout": 1e-3},
    "timm": {"activation": "relu6", **cifar.PYTORCH_LAYOUT},
}
RESIZE = {"keras": "bilinear", "timm": "bicubic"}


def get_config(preset: str = "keras") -> ml_collections.ConfigDict:
  layout, _, target = preset.partition(",")
  if layout not in LAYOUTS or target not in ("", "cifar10"):
    raise ValueError(f"Unknown preset {preset!r} in configs/imagenet.py: use 'keras' or 'timm', "
                     "optionally followed by ',cifar10'.")
  c = cifar.get_config()
  c.model.update(num_classes=1000, stem_stride=2, use_bias=False, **LAYOUTS[layout])
  c.model.kernel_init = "he_normal" if layout == "keras" else "torch"
  c.mean = c.std = (127.5, 127.5, 127.5)  # Pixels to [-1, 1].
  c.image_size = 224
  c.eval_crop = 0.875
  c.eval_resize = RESIZE[layout]
  c.dataset = "imagenet2012"
  c.eval_split = "validation"
  c.augment = "none"
  if target == "cifar10":
    c.dataset, c.eval_split, c.model.num_classes = "cifar10", "test", 10
    c.augment = "crop+flip"
    c.num_epochs, c.lr_boundaries, c.lr_values = 5, (3,), (0.001,)
    c.learning_rate = 0.01
    c.batch_size = 64
  return c
