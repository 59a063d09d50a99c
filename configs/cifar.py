r"""MobileNetV1 on CIFAR-10: the base config (every field, documented here) and its presets.

  .venv/bin/python run.py --config=configs/cifar.py --workdir=workdirs/keras   # Keras recipe
  .venv/bin/python run.py --config=configs/cifar.py:torch --workdir=...        # PyTorch layout
  .venv/bin/python run.py --config=configs/cifar.py:torch_long --workdir=...   # its long recipe
  .venv/bin/python run.py --config=configs/cifar.py:quick --workdir=...        # 45 min, 2 cores
  .venv/bin/python run.py --config=configs/cifar.py:smoke --workdir=...        # seconds (tests)

The default is the Keras CIFAR-10 MobileNetV1 script's recipe; each preset is a function below
whose docstring gives its source, hardware and expected result. Any field can be overridden:
`--config.num_epochs=1 --config.model.alpha=0.5`; an optional field takes `None`.
"""
import ml_collections

placeholder = ml_collections.config_dict.placeholder

# PyTorch's padding=1 and BatchNorm2d defaults (momentum 0.1, eps 1e-5).
PYTORCH_LAYOUT = {"padding": "symmetric", "bn_momentum": 0.9, "bn_epsilon": 1e-5}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  """The base config with `preset` ('' = none: the Keras reference recipe) applied."""
  if preset and preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} in configs/cifar.py: use '' (the base) or one "
                     f"of {', '.join(repr(p) for p in PRESETS)}.")
  c = base()
  if preset:
    PRESETS[preset](c)
  return c


def base() -> ml_collections.ConfigDict:
  """Every field, at the Keras CIFAR-10 script's values (the Keras layout of MobileNetV1,
  SGD-Nesterov, a piecewise-constant rate for 250 epochs). Needs a GPU; not yet run to the end.

    .venv/bin/python run.py --config=configs/cifar.py --workdir=workdirs/keras
  """
  c = ml_collections.ConfigDict()
  c.mode = "train"       # 'train' | 'eval' (test accuracy of the workdir's latest checkpoint)
  c.seed = 0             # Initialization, shuffling, augmentation, dropout (sampler.py).
  c.num_epochs = 250
  c.parallel = "jit"     # 'jit' (sharded over a device mesh) | 'pmap'
  # A workdir (trained, or from `python -m mobilenet_jax.convert`) whose latest params and
  # BatchNorm statistics start a new run; a head of another class count starts afresh.
  c.init_from = placeholder(str)
  c.data = _data()
  c.input = _input()
  c.augment = _augment()
  c.model = _model()
  c.optim = _optim()
  c.schedule = _schedule()
  c.ema = _ema()
  c.eval = _eval()
  c.checkpoint = _checkpoint()
  c.log = _log()
  c.distributed = _distributed()
  return c


def _data() -> ml_collections.ConfigDict:
  """Which examples (mobilenet_jax/datasets.py)."""
  d = ml_collections.ConfigDict()
  # Any tfds image classification dataset (grayscale is read as RGB); 'folder:PATH': one
  # subfolder of images per class, or train/ and val/ (or test/) folders of those (folders.py);
  # or 'npz:PATH': Keras' x_train, y_train, x_test, y_test arrays in one .npz file or a folder
  # of chunks, which `python -m mobilenet_jax.arrays` writes from any of these (arrays.py).
  d.name = "cifar10"
  d.dir = placeholder(str)       # tfds' data_dir; None: $TFDS_DATA_DIR, then tfds' default.
  d.download = True              # tfds: download and prepare the dataset when it is missing.
  d.train_split = "train"        # tfds split names, slicing allowed: 'train[:90%]'.
  d.eval_split = "test"
  # tfds and npz: datasets: None, the whole split; an int keeps the split's first n examples.
  d.train_examples = placeholder(int)
  d.eval_examples = placeholder(int)
  d.folder_holdout = 0.1   # Held out of each class for evaluation when a folder has no val/.
  # npz: datasets whose files hold no label_names: the class names (None: the label numbers).
  d.class_names = placeholder(tuple)
  return d


def _input() -> ml_collections.ConfigDict:
  """How batches reach the devices (datasets.py, streaming.py, input_pipeline.py)."""
  i = ml_collections.ConfigDict()
  i.batch_size = 128       # Global, across all devices.
  # With it set, batch_size is this many images per process times the number of processes.
  i.per_process_batch_size = placeholder(int)
  # 'device': the splits held in device memory, each step's batch gathered there; 'stream':
  # each step's batch read on the host, per process (streaming.py); 'auto': one of the two for
  # the whole run, 'device' when the training split takes at most device_share of one device's
  # memory, else 'stream'.
  i.mode = "device"
  i.device_share = 0.5
  i.workers = placeholder(int)  # Streamed input's decode threads; None: one per CPU core.
  i.prefetch = 2          # Streamed batches put on the devices ahead of the step.
  i.image_size = 32       # The paper's resolution multiplier: images are resized on device.
  i.mean = (125.307, 122.95, 113.865)  # Per-channel normalization of 0-255 pixels.
  i.std = (62.9932, 62.0887, 66.7048)
  return i


def _augment() -> ml_collections.ConfigDict:
  """What training sees that evaluation does not (input_pipeline.py, sampler.py)."""
  a = ml_collections.ConfigDict()
  # 'none' | 'crop' | 'flip' | 'crop+flip' (on device) | 'inception' (random-resized crop and
  # flip of image files, on the host: streamed folders).
  a.name = "crop+flip"
  a.crop_padding = 4       # Random translation of up to 4 pixels (0.125 of 32).
  # Mirror each training image in every other epoch (random first epoch) instead of at random.
  a.alternate_flips = False
  # Erase a square of this side (pixels, after translation and flip) around a random centre of
  # each training image, clipped at the border (DeVries & Taylor, 2017); 0: off.
  a.cutout = 0
  # RandAugment (Cubuk et al., 2019) in timm's notation (its --aa), e.g. 'rand-m9-mstd0.5-inc1':
  # n ops per image (default 2) at magnitude m of 10, on device (mobilenet_jax/randaugment.py);
  # '': off.
  a.randaugment = ""
  # Random erasing (Zhong et al., 2017) as timm's --reprob and --remode, after the resize: with
  # this probability a rectangle of 2-33% of the image, aspect ratio 0.3-3.3, is replaced by
  # 'const' zeros (the mean colour), a 'rand' normal colour, or 'pixel' normal noise; 0: off.
  a.erase_prob = 0.0
  a.erase_mode = "const"
  # Mixup (Zhang et al., 2017) and CutMix (Yun et al., 2019) as timm's Mixup: each image is mixed
  # with the one at the mirrored position of the global batch, at a ratio drawn from
  # Beta(alpha, alpha) (0: off), targets mixed alike (label smoothing included); with both on,
  # CutMix with probability `mix_switch_prob`. Applied with probability `mix_prob`, per batch
  # or per element (`mix_mode`). train_loss and train_accuracy are then against the label that
  # weighs more in each image's target.
  a.mixup_alpha = 0.0
  a.cutmix_alpha = 0.0
  a.mix_prob = 1.0
  a.mix_switch_prob = 0.5
  a.mix_mode = "batch"     # 'batch' | 'elem'
  a.label_smoothing = 0.0  # Training targets only; logged losses are plain cross-entropy.
  return a


def _model() -> ml_collections.ConfigDict:
  """The network (mobilenet_jax/models.py); the Keras layout by default."""
  m = ml_collections.ConfigDict()
  m.num_classes = 10
  m.alpha = 1.0            # The paper's width multiplier.
  m.stem_stride = 2        # 1: the PyTorch CIFAR script's stem.
  m.shallow = False        # Without the five 512-wide blocks (the paper's shallow network).
  m.use_bias = True        # Biases in the convolutions (the Keras script's).
  m.kernel_init = "he_normal"  # Keras' conv init; 'torch': PyTorch's default (see models.py)
  # Keras' layout: TensorFlow's 'same' padding, BatchNormalization's defaults (decay, epsilon).
  m.padding = "same"       # 'same' | 'symmetric' (PyTorch's padding=1)
  m.activation = "relu"    # 'relu' | 'relu6'
  m.bn_momentum = 0.99     # Running averages' decay: Keras' momentum, 1 - PyTorch's.
  m.bn_epsilon = 1e-3
  m.dropout = 0.0          # Before the head, in training only.
  m.conv = "auto"          # 'auto' (shifted on CPU, lax elsewhere) | 'lax' | 'shifted'
  m.dtype = "float32"      # or 'bfloat16' (compute dtype; parameters stay float32)
  return m


def _optim() -> ml_collections.ConfigDict:
  """The optimizer (mobilenet_jax/optimizers.py): SGD with Nesterov momentum by default."""
  o = ml_collections.ConfigDict()
  o.name = "sgd"           # 'sgd' | 'rmsprop' (TensorFlow's) | 'adamw' | 'lamb'.
  o.momentum = 0.9         # sgd and rmsprop; 0: none.
  o.nesterov = True        # sgd.
  # On conv and dense kernels but the depthwise ones (not BatchNorm, not biases).
  o.weight_decay = 1e-4
  # 'l2' (a penalty in the loss: sgd's and rmsprop's) | 'decoupled' (-rate * decay * weight in
  # the update: adamw's and lamb's); None: the optimizer's own.
  o.decay = placeholder(str)
  o.rms_decay = 0.9        # rmsprop: the mean square's decay...
  o.rms_initial = 1.0      # ...and its initial value (TensorFlow's 1; PyTorch's 0).
  o.b1 = 0.9               # adamw, lamb: the moments' decays.
  o.b2 = 0.999
  o.epsilon = placeholder(float)  # None: rmsprop 1.0 (TF-slim), adamw 1e-8, lamb 1e-6.
  o.clip_norm = placeholder(float)  # Clip the gradient to this global norm; None: off.
  # The batch's gradient as the mean of this many micro-batches', one after the other (a
  # recipe's batch on less device memory); BatchNorm sees each micro-batch alone (steps.py).
  o.micro_batches = 1
  return o


def _schedule() -> ml_collections.ConfigDict:
  """The learning rate per step (mobilenet_jax/optimizers.py): piecewise constant by default."""
  s = ml_collections.ConfigDict()
  s.name = "piecewise"         # 'piecewise' | 'cosine' | 'exponential'.
  s.learning_rate = 0.01       # The first rate (piecewise: until the first boundary).
  s.boundaries = (100, 200)    # piecewise: in epochs...
  s.rates = (0.001, 0.0001)    # ...and the rate from each boundary on.
  s.final_rate = 0.0           # cosine: the rate at the run's end.
  s.decay_factor = 0.94        # exponential: the rate's factor...
  s.decay_epochs = 2.5         # ...every this many epochs...
  s.staircase = True           # ...at once (False: smoothly).
  # A linear warm-up: the rate times (step + 1) / warm-up steps until the warm-up's end.
  s.warmup_epochs = 0.0
  # With it set, every rate is for a batch of this many images and scales linearly to
  # input.batch_size (Goyal et al., 2017); None: the rates are used as written.
  s.reference_batch = placeholder(int)
  return s


def _ema() -> ml_collections.ConfigDict:
  """A moving average of the weights and BatchNorm statistics (steps.py), evaluated beside
  them each epoch (`ema_test_*`) and used by predict, export and convert (their --raw: not)."""
  e = ml_collections.ConfigDict()
  e.decay = 0.0            # Its decay per step; 0: off. TF-slim's --moving_average_decay 0.9999.
  # TensorFlow's warm-up: the decay is at most (1 + step) / (10 + step) (num_updates).
  e.num_updates = False
  return e


def _eval() -> ml_collections.ConfigDict:
  """Evaluation and prediction (mobilenet_jax/inference.py)."""
  e = ml_collections.ConfigDict()
  e.every_epochs = 1
  e.flip = False           # Evaluate (and predict) on the mean logits of image and mirror.
  # The final evaluation (and --config.mode=eval, predict) also averages the logits of each view
  # translated by 0 and +-shift pixels along each axis (9x the work; 0: off). Per-epoch
  # evaluations skip it, to stay cheap.
  e.shift = 0
  # How predict and image folders fit an image of any size to image_size: None takes its centre
  # square; a fraction resizes its shorter side to image_size / crop and takes the centre
  # (ImageNet's 0.875), with `resize`'s interpolation ('bilinear' | 'bicubic').
  e.crop = placeholder(float)
  e.resize = "bilinear"
  # Images per inference sub-batch: None = automatic (on CPU as many as keep the largest
  # activation within 8 MiB of cache, at most 64; the whole batch elsewhere), 0 = the whole batch.
  e.chunk = placeholder(int)
  return e


def _checkpoint() -> ml_collections.ConfigDict:
  """Checkpoints in WORKDIR/checkpoints (mobilenet_jax/checkpoints.py); a rerun resumes."""
  k = ml_collections.ConfigDict()
  k.every_epochs = 1
  k.every_steps = placeholder(int)  # Also every this many steps (long epochs); None: off.
  k.keep = 3
  return k


def _log() -> ml_collections.ConfigDict:
  """Metrics: TensorBoard, WORKDIR/metrics.jsonl and the console (metric_logging.py)."""
  g = ml_collections.ConfigDict()
  # Also log the training loss, accuracy and rate every this many steps, and stop there if the
  # loss is not finite (long epochs); None: once per epoch.
  g.every_steps = placeholder(int)
  g.progress_bar = True
  # (first, end): a jax.profiler trace of steps first..end-1 in WORKDIR/plugins/profile, for
  # TensorBoard's profile tab (`pip install tensorboard-plugin-profile`); None: no trace.
  g.profile_steps = placeholder(tuple)
  return g


def _distributed() -> ml_collections.ConfigDict:
  """Multi-host (README, Multi-host; multihost.py): one process per host, the same command."""
  h = ml_collections.ConfigDict()
  h.enabled = False        # Connect the processes with jax.distributed.initialize().
  # Unset: $JAX_COORDINATOR_ADDRESS, then JAX's detection (SLURM, Open MPI, Cloud TPU, Kubernetes).
  h.coordinator_address = placeholder(str)  # 'host:port' of process 0
  h.num_processes = placeholder(int)
  h.process_id = placeholder(int)
  h.timeout_s = 300        # To connect, and to exchange configs: then an error.
  h.heartbeat_timeout_s = 60  # A process silent this long is dead: all the others stop.
  return h


def torch(c: ml_collections.ConfigDict) -> None:
  """The PyTorch CIFAR script's network (kuangliu/pytorch-cifar `MobileNet`): stride-1 stem,
  no biases, PyTorch's init, padding and BatchNorm; the base recipe. Needs a GPU; not yet run.

    .venv/bin/python run.py --config=configs/cifar.py:torch --workdir=workdirs/torch
  """
  c.model.update(stem_stride=1, use_bias=False, kernel_init="torch", **PYTORCH_LAYOUT)


def torch_long(c: ml_collections.ConfigDict) -> None:
  """The PyTorch CIFAR script's network and recipe (kuangliu/pytorch-cifar main.py): SGD at 0.1
  with momentum 0.9 (not Nesterov), L2 decay 5e-4, cosine decay to 0 over 200 epochs, batch 128,
  translation and flip, its normalization. Published runs of this network on CIFAR-10 report
  91-92% (e.g. 91.3-91.5% at 200 epochs of cosine decay, brondaeh/CIFAR-Image-Classifier, with
  stronger augmentation). A GPU for ~1-2 hours; not yet run here.

    .venv/bin/python run.py --config=configs/cifar.py:torch_long --workdir=workdirs/torch_long

  Where ours differs: the rate follows the cosine every step (PyTorch's CosineAnnealingLR steps
  once an epoch), and the decay spares BatchNorm, biases and the depthwise kernels (PyTorch's
  weight_decay takes every parameter; here one rule for all recipes: optimizers.py).
  """
  torch(c)
  c.num_epochs = 200
  c.input.update(batch_size=128, mean=(125.307, 122.961, 113.8575),  # 255 * its (0.4914,...),
                 std=(51.5865, 50.847, 51.255))                       # 255 * its (0.2023,...).
  c.optim.update(name="sgd", momentum=0.9, nesterov=False, weight_decay=5e-4)
  c.schedule.update(name="cosine", learning_rate=0.1, final_rate=0.0)


def torch_ra(c: ml_collections.ConfigDict) -> None:
  """`torch_long` with the CIFAR-10 augmentation of RandAugment (Cubuk et al., 2019): 3 ops per
  image, every one applied, at magnitude 5 (the paper's N and M for Wide-ResNet-28-10, 97.3%
  there; none published for MobileNetV1), with translation, flip and Cutout of 16 pixels, the
  paper's baseline augmentation. A GPU for ~2 hours; not yet run here.

    .venv/bin/python run.py --config=configs/cifar.py:torch_ra --workdir=workdirs/torch_ra

  Where ours differs: timm's op set and magnitude scale (the paper's 14 ops include identity;
  here a skipped op plays it only with p < 1), and RandAugment runs before the translation.
  """
  torch_long(c)
  c.augment.update(randaugment="rand-n3-m5-p1", cutout=16)


def quick(c: ml_collections.ConfigDict) -> None:
  """The most accuracy in ~45 minutes of 2 CPU cores (AMD EPYC VM, no GPU): 86.5-86.7% test
  accuracy over seeds 0-2 in 43-47 minutes (README, Results; every run: docs/quick_preset.md).

    .venv/bin/python run.py --config=configs/cifar.py:quick --workdir=workdirs/quick

  The Keras layout's cheap stride-2 stem, shallow (the five 512-wide 2x2 blocks cost time and
  learn little here), as wide as the budget allows, a short warm-up and a staircase, and cheap
  test-time views; PyTorch's padding, BatchNorm and init measured best.
  """
  c.model.update(PYTORCH_LAYOUT, kernel_init="torch", shallow=True, alpha=1.5)
  c.eval.update(flip=True, shift=3)
  c.augment.label_smoothing = 0.1
  c.num_epochs = 28
  c.schedule.learning_rate = 0.016  # One warm-up epoch.
  c.schedule.boundaries = (1, 14, 20, 23, 26)
  c.schedule.rates = (0.08, 0.032, 0.0128, 0.00384, 0.001152)
  c.optim.weight_decay = 5e-4


def smoke(c: ml_collections.ConfigDict) -> None:
  """Two epochs of 64 images at 16 pixels: seconds on a CPU, for tests and a first look.

    .venv/bin/python run.py --config=configs/cifar.py:smoke --workdir=/tmp/smoke
  """
  c.num_epochs = 2
  c.input.update(batch_size=16, image_size=16)
  c.model.alpha = 0.25
  c.schedule.boundaries = (1, 2)
  c.schedule.rates = (0.001, 0.0001)
  c.data.update(train_examples=64, eval_examples=40)


PRESETS = {"torch": torch, "torch_long": torch_long, "torch_ra": torch_ra, "quick": quick,
           "smoke": smoke}
