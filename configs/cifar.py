r"""MobileNetV1 on CIFAR-10: the Keras reference recipe and its presets. Every field is here.

  .venv/bin/python run.py --config=configs/cifar.py --workdir=workdirs/keras   # Keras recipe
  .venv/bin/python run.py --config=configs/cifar.py:torch --workdir=...        # PyTorch layout
  .venv/bin/python run.py --config=configs/cifar.py:quick --workdir=...        # see below
  .venv/bin/python run.py --config=configs/cifar.py:smoke --workdir=...        # seconds (tests)

quick: 2 CPU cores (AMD EPYC VM, no GPU), 43-47 minutes, 86.5-86.7% test accuracy over seeds
0-2 (README, Results). The default and torch recipes (250 epochs) need a GPU; not yet run.
Any field can be overridden: `--config.num_epochs=1 --config.model.alpha=0.5`.
"""
import ml_collections


# PyTorch's padding=1 and BatchNorm2d defaults (momentum 0.1, eps 1e-5).
PYTORCH_LAYOUT = {"padding": "symmetric", "bn_momentum": 0.9, "bn_epsilon": 1e-5}


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  """Returns the config for `preset` ('' = the Keras reference recipe)."""
  c = ml_collections.ConfigDict()
  c.mode = "train"            # 'train' | 'eval' (test accuracy of the workdir's latest checkpoint)

  # Data (mobilenet_jax/datasets.py).
  # Any tfds image classification dataset (grayscale is read as RGB); 'folder:PATH': one
  # subfolder of images per class, or train/ and val/ (or test/) folders of those (folders.py);
  # or 'npz:PATH': Keras' x_train, y_train, x_test, y_test arrays in one .npz file or a folder
  # of chunks, which `python -m mobilenet_jax.arrays` writes from any of these (arrays.py).
  c.dataset = "cifar10"
  # npz: datasets whose files hold no label_names: the class names (None: the label numbers).
  c.class_names = ml_collections.config_dict.placeholder(tuple)
  c.folder_holdout = 0.1     # Held out of each class for evaluation when a folder has no val/.
  # 'device': the splits held in device memory, each step's batch gathered there; 'stream':
  # each step's batch read on the host, per process (streaming.py); 'auto': device when the
  # training split takes at most input_device_share of one device's memory, else stream.
  c.input = "device"
  c.input_device_share = 0.5
  c.input_workers = ml_collections.config_dict.placeholder(int)  # Decode threads; None: 1/core.
  c.prefetch = 2             # Streamed batches put on the devices ahead of the step.
  c.train_split = "train"    # tfds split names, slicing allowed: 'train[:90%]', 'train[90%:]'.
  c.eval_split = "test"
  # None: $TFDS_DATA_DIR, then tfds' default.
  c.data_dir = ml_collections.config_dict.placeholder(str)
  c.download = True
  c.image_size = 32          # The paper's resolution multiplier: resize on device.
  # 'none' | 'crop' | 'flip' | 'crop+flip' (on device) | 'inception' (random-resized crop and
  # flip of image files, on the host: streamed folders).
  c.augment = "crop+flip"
  c.crop_padding = 4         # Random translation of up to 4 pixels (0.125 of 32).
  # Mirror each training image in every other epoch (random first epoch) instead of at random.
  c.alternate_flips = False
  # Erase a square of this side (pixels, after translation and flip) around a random centre of
  # each training image, clipped at the border (DeVries & Taylor, 2017); 0: off.
  c.cutout = 0
  c.eval_flip = False        # Evaluate (and predict) on the mean logits of image and mirror.
  # The final evaluation (and --config.mode=eval, predict) also averages the logits of each view
  # translated by 0 and +-eval_shift pixels along each axis (9x the work; 0: off). Per-epoch
  # evaluations skip it, to stay cheap.
  c.eval_shift = 0
  # How predict fits an image of any size to image_size: None takes its centre square;
  # a fraction resizes its shorter side to image_size / eval_crop and takes the centre
  # (ImageNet's 0.875), with eval_resize's interpolation ('bilinear' | 'bicubic').
  c.eval_crop = ml_collections.config_dict.placeholder(float)
  c.eval_resize = "bilinear"
  c.mean = (125.307, 122.95, 113.865)
  c.std = (62.9932, 62.0887, 66.7048)
  # tfds and npz: datasets: None, the whole split; an int keeps the split's first n examples.
  c.train_examples = ml_collections.config_dict.placeholder(int)
  c.eval_examples = ml_collections.config_dict.placeholder(int)

  # Model (mobilenet_jax/models.py).
  c.model = ml_collections.ConfigDict()
  c.model.num_classes = 10
  c.model.alpha = 1.0
  c.model.stem_stride = 2
  c.model.shallow = False
  c.model.use_bias = True
  c.model.kernel_init = "he_normal"  # Keras' conv init; 'torch': PyTorch's default (see models)
  # Keras' layout: TensorFlow's 'same' padding, BatchNormalization's defaults (decay, epsilon).
  c.model.padding = "same"   # 'same' | 'symmetric' (PyTorch's padding=1)
  c.model.activation = "relu"  # 'relu' | 'relu6'
  c.model.bn_momentum = 0.99  # Running averages' decay: Keras' momentum, 1 - PyTorch's.
  c.model.bn_epsilon = 1e-3
  c.model.dropout = 0.0      # Before the head, in training only.
  c.model.conv = "auto"      # 'auto' (shifted on CPU, lax elsewhere) | 'lax' | 'shifted'
  c.model.dtype = "float32"   # or 'bfloat16' (compute dtype; parameters stay float32)

  # Optimization (mobilenet_jax/train.py): SGD, Nesterov, piecewise-constant rate.
  c.batch_size = 128          # Global, across all devices.
  # With it set, batch_size is this many images per process times the number of processes.
  c.per_process_batch_size = ml_collections.config_dict.placeholder(int)
  # With it set, every rate below is for a batch of this many images and scales linearly to
  # batch_size (Goyal et al., 2017); None: the rates are used as written.
  c.lr_batch = ml_collections.config_dict.placeholder(int)
  c.num_epochs = 250
  c.learning_rate = 0.01        # Until the first boundary.
  c.lr_boundaries = (100, 200)  # In epochs.
  c.lr_values = (0.001, 0.0001)  # The rate from each boundary on.
  c.momentum = 0.9
  c.weight_decay = 1e-4         # L2 on conv and dense kernels, added to the loss.
  c.label_smoothing = 0.0       # Training targets only; logged losses are plain cross-entropy.

  # Execution.
  c.parallel = "jit"          # 'jit' (sharded over a device mesh) | 'pmap'
  # Multi-host (README, Multi-host): one process per host, the same command on each.
  c.distributed = False       # Connect the processes with jax.distributed.initialize().
  # Unset: $JAX_COORDINATOR_ADDRESS, then JAX's detection (SLURM, Open MPI, Cloud TPU, Kubernetes).
  c.coordinator_address = ml_collections.config_dict.placeholder(str)  # 'host:port' of process 0
  c.num_processes = ml_collections.config_dict.placeholder(int)
  c.process_id = ml_collections.config_dict.placeholder(int)
  c.distributed_timeout_s = 300  # To connect, and to exchange configs: then an error.
  c.heartbeat_timeout_s = 60     # A process silent this long is dead: all the others stop.
  c.seed = 0
  # A workdir (trained, or from `python -m mobilenet_jax.convert`) whose latest params and
  # BatchNorm statistics start a new run; a head of another class count starts afresh.
  c.init_from = ml_collections.config_dict.placeholder(str)
  # Images per inference sub-batch (evaluation, prediction): None = automatic (on CPU as many
  # as keep the largest activation within 8 MiB of cache, at most 64: 32 for the stride-1
  # layout, 64 for stride 2; the whole batch elsewhere), 0 = the whole batch.
  c.inference_chunk = ml_collections.config_dict.placeholder(int)
  c.eval_every_epochs = 1
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 3
  c.progress_bar = True

  if preset == "torch":
    c.model.update(stem_stride=1, use_bias=False, kernel_init="torch", **PYTORCH_LAYOUT)
  elif preset == "quick":
    # The most accuracy in ~45 minutes of 2 CPU cores: the Keras layout's cheap stride-2 stem,
    # shallow (the five 512-wide 2x2 blocks cost time and learn little here), as wide as the
    # budget allows, a short warm-up and a staircase, and cheap test-time views. Measured with
    # PyTorch's padding, BatchNorm and init; every run behind each choice: docs/quick_preset.md.
    c.model.update(PYTORCH_LAYOUT)
    c.model.kernel_init = "torch"
    c.model.shallow = True
    c.model.alpha = 1.5
    c.eval_flip = True
    c.eval_shift = 3
    c.label_smoothing = 0.1
    c.num_epochs = 28
    c.learning_rate = 0.016
    c.lr_boundaries = (1, 14, 20, 23, 26)
    c.lr_values = (0.08, 0.032, 0.0128, 0.00384, 0.001152)  # One warm-up epoch at 0.016.
    c.weight_decay = 5e-4
  elif preset == "smoke":
    c.num_epochs = 2
    c.batch_size = 16
    c.model.alpha = 0.25
    c.image_size = 16
    c.lr_boundaries = (1, 2)
    c.lr_values = (0.001, 0.0001)
    c.train_examples = 64
    c.eval_examples = 40
  elif preset:
    raise ValueError(f"Unknown preset {preset!r} in configs/cifar.py: "
                     "use '', 'torch', 'quick' or 'smoke'.")
  return c
