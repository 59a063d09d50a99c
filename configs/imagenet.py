r"""MobileNetV1 at ImageNet's 224x224 in the layouts of the public pretrained checkpoints.

  python -m mobilenet_jax.convert --format=keras_app --alpha=1.0 --image_size=224 \
      --workdir=workdirs/keras_1.0_224                  # the config: configs/imagenet.py:keras
  python -m mobilenet_jax.convert --format=timm --file=model.safetensors \
      --workdir=workdirs/timm                           # the config: configs/imagenet.py:timm
  python run.py --config=configs/imagenet.py:keras,cifar10 --config.model.alpha=0.25 \
      --config.input.image_size=128 --config.init_from=workdirs/keras_0.25_128 --workdir=...

Presets (`:keras` or `:timm`, optionally `,cifar10`):
- keras: Keras applications' `MobileNet` (70.4% top-1 at 1.0-224 by keras.io): ReLU6, TensorFlow
  padding, Keras' BatchNorm, dropout 1e-3 before the head; `alpha` 0.25/0.5/0.75/1.0 and
  `input.image_size` 128/160/192/224 select one of its 16 checkpoints.
- timm: timm's `mobilenetv1_100` (75.4% top-1 at 224 by timm's results table): ReLU6,
  PyTorch's padding and BatchNorm.
Both take pixels scaled to [-1, 1], and predict fits an image as both evaluate: its shorter side
resized to image_size / 0.875 (Keras: bilinear, timm: bicubic), then the centre crop.
- `,cifar10`: fine-tunes that layout on CIFAR-10 (10 classes, a new head, `init_from` a converted
  workdir): 5 epochs, 0.01 for 3 then 0.001, CIFAR's translation and flip before the upscale.

`:train` trains MobileNetV1 on ImageNet from scratch, streamed from a folder of JPEGs:

  python run.py --config=configs/imagenet.py:train --config.data.name=folder:/data/imagenet \
      --workdir=workdirs/imagenet_1.0_224        # on each host of a multi-host run, with
      # --config.distributed.enabled=True (README, Multi-host); alpha and resolution as flags:
      # --config.model.alpha=0.5 --config.input.image_size=160

The recipe is TF-slim's `nets/mobilenet_v1_train.py` (tensorflow/models), the MobileNetV1
authors' published training script: plain SGD at 0.045 for 64 images, decayed by 0.94 every
2.5 epochs (staircase), L2 weight decay 4e-5 on all but the depthwise kernels, BatchNorm decay
0.9997 and epsilon 1e-3, dropout 1e-3 before the head, ReLU6 and TensorFlow's padding, pixels
scaled to [-1, 1]. Adapted: 64 images per process with the rate scaled linearly to the global
batch (`schedule.reference_batch`; Goyal et al., 2017), 100 epochs (slim sets no end),
He-normal kernels (slim: truncated normal, stddev 0.09), and Inception's random-resized crop and
flip without its colour distortion; evaluation resizes the shorter side to 256 and takes the
centre 224.
The paper reports 70.6% top-1 for 1.0-224; this preset has not been run to the end here.

`:paper` is the paper's own optimizer on the same network and input: RMSProp and a weight
average, as TF-slim's `train_image_classifier.py` (which made the released checkpoints) runs
them (its docstring: the values and the choices).

ImageNet must be downloaded by hand (its licence needs an account):
1. At https://image-net.org/download-images.php (ILSVRC 2012), download
   ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB).
2. mkdir -p /data/imagenet/train /data/imagenet/val; cd /data/imagenet/train;
   tar xf ILSVRC2012_img_train.tar; for f in *.tar; do d=${f%.tar}; mkdir $d;
   tar xf $f -C $d; rm $f; done        # 1000 folders n01440764 ... of JPEGs
3. cd /data/imagenet/val; tar xf ILSVRC2012_img_val.tar, then sort the 50,000 images into the
   same 1000 class folders with the widely used script
   https://raw.githubusercontent.com/soumith/imagenetloader.torch/master/valprep.sh
4. Pass --config.data.name=folder:/data/imagenet (every host reads the same path, e.g. NFS).
"""
import ml_collections

from configs import cifar

RESIZE = {"keras": "bilinear", "timm": "bicubic"}


def get_config(preset: str = "keras") -> ml_collections.ConfigDict:
  """`keras` or `timm`, optionally with `,cifar10`; or `train`, `paper` or `timm_ra`."""
  name, _, target = preset.partition(",")
  if (name not in PRESETS or target not in ("", "cifar10") or
      (name in ("train", "paper", "timm_ra") and target)):
    raise ValueError(f"Unknown preset {preset!r} in configs/imagenet.py: use 'keras' or 'timm', "
                     "optionally followed by ',cifar10', or 'train', 'paper' or 'timm_ra'.")
  c = cifar.base()
  PRESETS[name](c)
  if target:
    cifar10(c)
  return c


def _imagenet(c: ml_collections.ConfigDict, layout: str) -> None:
  """What both public layouts share: 1000 classes at 224, pixels to [-1, 1], no bias, and
  evaluation's resize of the shorter side to 256 (with the layout's interpolation), centre 224."""
  c.model.update(num_classes=1000, stem_stride=2, use_bias=False, activation="relu6")
  c.input.update(image_size=224, mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5))
  c.eval.update(crop=0.875, resize=RESIZE[layout])
  c.data.update(name="imagenet2012", eval_split="validation")
  c.augment.name = "none"


def keras(c: ml_collections.ConfigDict) -> None:
  """Keras applications' `MobileNet` (70.4% top-1 at 1.0-224 by keras.io): TensorFlow padding,
  Keras' BatchNorm and init, dropout 1e-3 before the head. Converted, not trained (any machine):

    python -m mobilenet_jax.convert --format=keras_app --workdir=W   # config: imagenet.py:keras
  """
  _imagenet(c, "keras")
  c.model.update(padding="same", bn_momentum=0.99, bn_epsilon=1e-3, dropout=1e-3,
                 kernel_init="he_normal")


def timm(c: ml_collections.ConfigDict) -> None:
  """timm's `mobilenetv1_100` (75.4% top-1 at 224 by timm's results table): PyTorch's padding,
  BatchNorm and init. Converted, not trained (any machine):

    python -m mobilenet_jax.convert --format=timm --file=F --workdir=W   # imagenet.py:timm
  """
  _imagenet(c, "timm")
  c.model.update(kernel_init="torch", **cifar.PYTORCH_LAYOUT)


def cifar10(c: ml_collections.ConfigDict) -> None:
  """`,cifar10`: fine-tunes the layout on CIFAR-10 from a converted workdir (`init_from`): 10
  classes with a new head, CIFAR's translation and flip before the upscale, 5 epochs at 0.01
  for 3 then 0.001, batch 64 (our choice; a GPU for 224 pixels, not yet run):

    python run.py --config=configs/imagenet.py:keras,cifar10 --config.init_from=W --workdir=...
  """
  c.data.update(name="cifar10", eval_split="test")
  c.model.num_classes = 10
  c.augment.name = "crop+flip"
  c.num_epochs = 5
  c.schedule.update(learning_rate=0.01, boundaries=(3,), rates=(0.001,))
  c.input.batch_size = 64


def train(c: ml_collections.ConfigDict) -> None:
  """TF-slim's MobileNetV1 recipe on a streamed ImageNet folder; the paper reports 70.6% top-1
  (module docstring: the adaptations; GPUs or TPUs for days; not yet run to the end here).

    python run.py --config=configs/imagenet.py:train --config.data.name=folder:D --workdir=...
  """
  keras(c)
  c.model.update(bn_momentum=0.9997, bn_epsilon=1e-3, dropout=1e-3)
  c.data.name = "folder:~/imagenet"
  c.input.update(mode="auto", per_process_batch_size=64)  # auto streams: see augment.name.
  c.augment.name = "inception"
  c.schedule.reference_batch = 64
  c.optim.momentum = 0.0  # Slim's GradientDescentOptimizer.
  c.optim.weight_decay = 4e-5
  c.num_epochs = 100
  c.schedule.update(name="exponential", learning_rate=0.045, decay_factor=0.94,
                    decay_epochs=2.5, staircase=True)
  c.checkpoint.keep = 2


def paper(c: ml_collections.ConfigDict) -> None:
  """The paper's recipe (Howard et al., Sec. 4: RMSProp and asynchronous gradient descent "similar
  to Inception V3"; 70.6% top-1 at 1.0-224) as TF-slim's train_image_classifier.py runs it:
  RMSProp in TensorFlow's form with its defaults (decay 0.9, momentum 0.9, epsilon 1.0, the mean
  square from 1), 0.045 decayed by 0.94 every 2 epochs (staircase; Inception V3's), and the
  moving average of every model variable, BatchNorm's included (--moving_average_decay; 0.9999
  as TF-slim's Inception scripts, with the global step as num_updates), which is what evaluation
  and the released checkpoints use. The network, input and weight decay are `:train`'s.
  GPUs or TPUs for days; not yet run here.

    python run.py --config=configs/imagenet.py:paper --config.data.name=folder:D --workdir=...

  Chosen where the sources leave it open: 0.045 is for 32 images (TF-slim's --batch_size, one
  replica's batch in Inception V3's 50) and scales linearly to the global batch, 64 per process
  (the rate of a synchronous batch, not of 50 asynchronous replicas); 100 epochs (no end given).
  """
  train(c)
  c.optim.update(name="rmsprop", momentum=0.9, rms_decay=0.9, rms_initial=1.0, epsilon=1.0)
  c.schedule.update(learning_rate=0.045, reference_batch=32, decay_factor=0.94, decay_epochs=2.0)
  c.ema.update(decay=0.9999, num_updates=True)


def timm_ra(c: ml_collections.ConfigDict) -> None:
  """timm's "RA" recipe, the template of its MobileNetV2/V3 `ra_in1k` weights (their model
  cards; recipe B of Wightman et al., "ResNet strikes back", 2021), in the MobileNetV3-Large
  line of timm's docs/training_hparam_examples.md (75.8% top-1 for that network; none published
  for MobileNetV1), on timm's MobileNetV1 layout: RMSProp in TensorFlow's form (epsilon 1e-3),
  0.064 for 1024 images decayed x0.973 every 2.4 epochs (staircase), weight decay 1e-5 (L2),
  dropout 0.2, the weight average at 0.9999, RandAugment rand-m9-mstd0.5 and random erasing of
  20% of the images with per-pixel noise, for 600 epochs. GPUs or TPUs for days; not yet run.

    python run.py --config=configs/imagenet.py:timm_ra --config.data.name=folder:D --workdir=...

  Chosen where the source leaves it open or we differ: a 3-epoch linear warm-up from 0 (timm's
  default of the time, from 1e-6), no --lr-noise, RandAugment always bilinear (timm picks
  bilinear or bicubic at random), and the input and streaming of `:train`.
  """
  timm(c)
  c.data.name = "folder:~/imagenet"
  c.input.update(mode="auto", per_process_batch_size=64)
  c.augment.update(name="inception", randaugment="rand-m9-mstd0.5", erase_prob=0.2,
                   erase_mode="pixel")
  c.model.dropout = 0.2
  c.optim.update(name="rmsprop", momentum=0.9, rms_decay=0.9, epsilon=1e-3, weight_decay=1e-5)
  c.schedule.update(name="exponential", learning_rate=0.064, reference_batch=1024,
                    decay_factor=0.973, decay_epochs=2.4, staircase=True, warmup_epochs=3.0)
  c.ema.decay = 0.9999
  c.num_epochs = 600
  c.checkpoint.keep = 2


PRESETS = {"keras": keras, "timm": timm, "train": train, "paper": paper, "timm_ra": timm_ra}
