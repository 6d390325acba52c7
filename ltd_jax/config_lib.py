"""The full default config (every key a run may set) and its validation.

Config files in ``configs/`` start from ``default_config()`` and change what their paper sets;
``validate`` turns any impossible value into a one-line ``ConfigError`` before compilation.
"""

from __future__ import annotations

import ast
import difflib
import glob
import importlib.util
import os
import sys

import ml_collections

from ltd_jax import attacks
from ltd_jax import datasets
from ltd_jax import download
from ltd_jax import errors
from ltd_jax import evaluate
from ltd_jax import losses
from ltd_jax import methods
from ltd_jax import targets
from ltd_jax.errors import ConfigError

EVAL_ATTACKS = evaluate.ATTACKS
SELECTIONS = ('robust', 'fair', 'last')
TEACHER_SOURCES = ('none', 'train', 'workdir', 'torch')


def default_config() -> ml_collections.ConfigDict:
  """TRADES WRN-34-10 on CIFAR-10; every key that any run reads is defined here."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = 'trades'
  c.eps = 8 / 255  # L-inf threat model of the training attacks (and of evaluation, unless eval.eps).
  c.dtype = 'float32'

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'
  c.data.source = 'auto'  # auto | pickle | tfds | folder (imagenet, tiny_imagenet)
  c.data.dir = ''  # Folder holding cifar-10-batches-py / cifar-100-python (or the tfds data_dir).
  # Absent CIFAR-10/100 and Tiny-ImageNet are fetched from their official archives into data.dir
  # (default ~/.cache/ltd_jax), checksum verified (ltd_jax/download.py); ImageNet stays manual.
  c.data.download = True
  c.data.url = ''  # '' = the registry's official URL; a mirror or a local server otherwise.
  c.data.checksum = ''  # '' = the registry's; md5:HEX or sha256:HEX with data.url.
  c.data.augment = 'auto'  # auto | none | crop_flip
  c.data.val_size = 0  # Stratified hold-out from the training set for checkpoint selection.
  c.data.split_seed = 0
  c.data.on_device = True  # Keep an in-memory training set on the devices; steps send indices.
  # Generated images mixed into every training batch (ltd_jax/generated.py): .npz archives with
  # uint8 image [N, H, W, C] and integer label [N] (Wang et al. 2023's 1M-50M EDM archives): a
  # path, a glob or comma-separated shards. A fraction generated_fraction of each batch is
  # generated (their code: 0.7); an epoch is ceil(num_real / batch_size) batches.
  c.data.generated_path = ''
  c.data.generated_fraction = 0.7
  c.data.generated_required = False  # True: a run without data.generated_path stops (recipes)
  # Streamed datasets (imagenet, tiny_imagenet): decode/crop worker threads, crop size (0: the
  # dataset's own, 224 / 64) and the smallest area fraction of ImageNet's random-resized-crop.
  c.data.num_workers = 16
  c.data.image_size = 0
  c.data.rrc_scale_min = 0.08

  # Several hosts: jax.distributed.initialize (autodetected on SLURM / Open MPI / Cloud TPU when
  # coordinator_address is empty). One host uses all of its devices without it.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False
  c.distributed.coordinator_address = ''  # host:port of process 0
  c.distributed.num_processes = 0
  c.distributed.process_id = -1

  c.model = ml_collections.ConfigDict()
  c.model.name = 'wrn-34-10'
  c.model.base_width = 64  # ResNet-18 / PreActResNet-18 stem width (tests shrink it).
  c.model.width = 32  # small_cnn width.
  # Recompute each residual block's activations in the backward pass (jax.checkpoint): less
  # memory for the same numbers. remat_policy: convs (keep the convolutions' outputs, recompute
  # BatchNorm and activations) | nothing (keep only each block's input).
  c.model.remat = False
  c.model.remat_policy = 'convs'
  # BatchNorm momentum in PyTorch's convention (running = (1 - m) running + m batch) of the
  # WideResNets; 0.1 is PyTorch's default, Gowal et al.'s and Wang et al.'s WRNs use 0.01.
  c.model.bn_momentum = 0.1

  c.num_epochs = 76
  c.batch_size = 128
  c.max_steps = 0  # >0 stops training after this many steps (smoke tests, debugging).

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = False
  c.optim.weight_decay = 2e-4
  # Epoch counts after which the lr is multiplied by lr_decay (TRADES: 1-indexed epochs 75, 90, 100).
  c.optim.lr_boundaries_epochs = (74, 89, 99)
  c.optim.lr_decay = 0.1
  c.optim.warmup_epochs = 0.0  # >0: linear lr warm-up over this many epochs (large batches).
  # piecewise (lr_boundaries_epochs) | cosine: PyTorch's OneCycleLR with cosine annealing over
  # num_epochs (the DM-Improves-AT code's 'cosinew'): from lr / cosine_initial_div up to lr over
  # the first cosine_warmup_fraction of the run, then down to lr / (initial_div * final_div);
  # updated once per epoch (cosine_per=epoch, as that code steps it) or every step. With
  # cycle_momentum (low, high), the momentum runs the other way, high -> low -> high, as
  # OneCycleLR's default cycle_momentum=True does to SGD's momentum.
  c.optim.schedule = 'piecewise'
  c.optim.cosine_warmup_fraction = 0.025
  c.optim.cosine_initial_div = 25.0
  c.optim.cosine_final_div = 1e4
  c.optim.cosine_per = 'epoch'
  c.optim.cycle_momentum = ()
  # False: no weight decay on BatchNorm's scale and bias (the DM-Improves-AT code's group_weight).
  c.optim.weight_decay_batchnorm = True
  # k > 1: each global batch runs as k micro-batches of batch_size / k whose gradients are
  # averaged into one update (BatchNorm per micro-batch; train.train_step).
  c.optim.accumulation_steps = 1

  c.attack = ml_collections.ConfigDict()  # The training attack (inner maximisation).
  c.attack.alpha = 2 / 255
  c.attack.steps = 10
  c.attack.init = 'normal'  # normal | normal_clipped | uniform | uniform_unclipped | none
  # eval: running BN statistics (spec default) | train: batch statistics, the running ones moving
  # with every attack forward (PyTorch's model.train() attack: ARD, IAD, Fair-ARD) | batch: batch
  # statistics, the running ones left alone (train mode with track_running_stats off: the
  # DM-Improves-AT TRADES attack)
  c.attack.bn_mode = 'eval'
  # True writes the attack's K steps out, False runs them as a lax.fori_loop; None (default) takes
  # the backend's default (attacks.UNROLL_DEFAULTS: unrolled on CPU, where the loop ran 2.2x
  # slower, see benchmarks/README.md).
  c.attack.unroll = ml_collections.config_dict.placeholder(bool)

  c.trades = ml_collections.ConfigDict()
  c.trades.beta = 6.0
  c.trades.label_smoothing = 0.0  # s of the natural term's labels (Wang et al. 2023: 0.1)

  c.awp = ml_collections.ConfigDict()  # TRADES-AWP weight perturbation (method awp, ltd.base=awp)
  c.awp.gamma = 0.005
  c.awp.warmup_epochs = 10  # AWP from this 1-indexed epoch on (the AWP code's epoch >= awp_warmup)
  # One SGD ascent step of the proxy (no momentum, no weight decay); d is normalised per layer,
  # so this size does not change d. The AWP code uses its lr, 0.1.
  c.awp.proxy_lr = 0.1
  # The proxy's loss: 'trades' (CE + beta KL with hard labels, the AWP code's calc_awp, also for
  # LTD-AWP) or 'method' (the method's own loss, e.g. LTD's soft-label loss).
  c.awp.proxy_loss = 'trades'

  c.ltd = ml_collections.ConfigDict()
  c.ltd.base = 'trades'  # trades | awp
  c.ltd.teacher_temperature = 5.0  # T_t
  c.ltd.student_temperature = 1.0  # T_s, training only
  # Temperature search (--mode=temperature_search), paper section 4.2.
  c.ltd.search_temperatures = (1.0, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 20.0)
  c.ltd.search_accuracy_threshold = 0.5  # step 1: T_max = lowest T whose substitute falls below
  c.ltd.search_epochs = 0  # epochs per candidate model (0: num_epochs)

  c.rslad = ml_collections.ConfigDict()  # shared by rslad and absld
  c.rslad.alpha = 5 / 6
  c.rslad.reduction = 'elementwise_mean'  # sum | batchmean | elementwise_mean
  c.rslad.loss_scale = 1.0  # RSLAD multiplies by 10 on CIFAR-100
  # The RSLAD / ABSLD code's KL takes log(p + 1e-5) of the teacher's p: set 1e-5 to log its loss
  # values; the gradient is the same (the term is constant in the student).
  c.rslad.target_log_eps = 0.0

  c.absld = ml_collections.ConfigDict()
  c.absld.tau_init = 1.0
  c.absld.beta = 0.1  # temperature learning rate, decayed with the lr milestones
  c.absld.tau_min = 0.5
  c.absld.tau_max = 5.0
  c.absld.gap_rtol = 1e-6  # skip the update when max|gap| <= gap_rtol * max|risk|
  c.absld.released_code_aliasing = False
  # Per-class risk of Eq. 10: 'mean' cross-entropy (unbalanced data safe) or 'sum' (the released
  # script; equal updates when the classes are balanced).
  c.absld.risk = 'mean'

  # ABSLD Table 6 "Manual" (method absld_manual): fixed teacher temperatures per class, the same
  # for clean and adversarial targets. CIFAR-10's usual hard classes: bird, cat, deer, dog.
  c.absld.manual_hard_classes = (2, 3, 4, 5)
  c.absld.manual_hard_temperature = 0.5
  c.absld.manual_easy_temperature = 5.0

  c.adaad = ml_collections.ConfigDict()  # AdaAD (boyellow/AdaAD)
  c.adaad.alpha = 1.0  # weight of KL(t(x') || f(x')); 1 - alpha on KL(t(x) || f(x))
  # The code's KLDivLoss: its default elementwise mean on CIFAR-10, sum / B ('batchmean') on
  # CIFAR-100.
  c.adaad.reduction = 'elementwise_mean'

  # ARD (goldblum/AdversariallyRobustDistillation) and the methods built on it (IAD, Fair-ARD):
  # alpha T^2 KL(t(x)/T || f(x')/T) + (1 - alpha) CE(f(x), y).
  c.ard = ml_collections.ConfigDict()
  c.ard.alpha = 1.0
  c.ard.temperature = 30.0
  c.ard.reduction = 'elementwise_mean'  # ARD's KLDivLoss(); IAD: batchmean (Fair-ARD: its own)

  c.iad = ml_collections.ConfigDict()  # IAD-I (ZFancy/IAD)
  c.iad.beta = 0.1  # reliability softmax(t(x'))[y]^beta
  c.iad.begin_epoch = 60  # the introspection term from this 0-indexed epoch on

  # Fair-ARD / Fair-RSLAD (NISP-official/Fair-ARD): class weights from kappa, the per-class mean
  # count of attack iterates still classified correctly: (1 / (kappa + guard))^beta scaled to sum
  # to C, clipped to [clip_min, clip_max]. Fair-RSLAD's code has no guard (0).
  c.fair = ml_collections.ConfigDict()
  c.fair.beta = 2.0
  c.fair.kappa_guard = 1e-5
  c.fair.clip_min = 5 / 6
  c.fair.clip_max = 5 / 2

  c.bat = ml_collections.ConfigDict()  # BAT: x_fa is the (tau + 1)-th misclassified iterate
  c.bat.tau = 1

  # FRL reweight + remargin (hannxu123/fair_robust frlrmrw.py, utils_frl2.py), fine-tuning from a
  # warm start (``init``) against a held-out validation split (``data.val_size``).
  c.frl = ml_collections.ConfigDict()
  c.frl.beta = 1.5  # weight of the boundary term
  c.frl.tau_nat = 0.07  # fairness constraints (the code's bound0 / bound1; ABSLD A.3: 0.05)
  c.frl.tau_bndy = 0.07
  c.frl.rate1 = 0.05  # lambda_nat step (x2 for lambda_bndy), halved every rate1_halve_every epochs
  c.frl.rate1_halve_every = 40
  c.frl.rate2 = 0.2  # lambda_margin step
  c.frl.limit = 0.5  # the code's lim: lambda_nat and lambda_bndy rescaled to sum <= limit
  c.frl.margin_exponent = 2.0  # eps factor clip(exp(2 lambda_margin), 0.98, 3)
  c.frl.margin_min = 0.98
  c.frl.margin_max = 3.0
  c.frl.step_size = 'max_eps_quarter'  # max_eps_quarter (the code) | config (attack.alpha)
  c.frl.validation_pgd_steps = 20

  # CFA (PKU-ML/CFA train.py): class-wise calibrated margins (CCM), class-wise TRADES weights
  # (CCR) and the fairness-aware weight average (FAWA) on a held-out validation split.
  c.cfa = ml_collections.ConfigDict()
  c.cfa.lambda_1 = 0.5  # eps_c = (lambda_1 + A_c) eps
  c.cfa.lambda_2 = 0.5  # b_c = (lambda_2 + A_c) beta / (1 + (lambda_2 + A_c) beta)
  c.cfa.begin_epoch = 10  # 0-indexed epoch from which the class-wise values apply
  c.cfa.fawa_threshold = 0.24  # the code's default (its README's AT+CFA command: 0.2)
  c.cfa.fawa_decay = 0.88
  c.cfa.fawa_worst = 'worst'  # worst | worst10 (ABSLD A.3, CIFAR-100: the worst 10% of classes)
  c.cfa.fawa_pgd_steps = 10

  # A warm start of the student (FRL's hot start): from a run of this project trained first as a
  # stage in WORKDIR/init (``source=train`` with ``init.config``) or from ``init.path``; a run
  # that already has its own checkpoint resumes from that instead.
  c.init = ml_collections.ConfigDict()
  c.init.source = 'none'  # none | train | workdir
  c.init.config = ''
  c.init.path = ''
  c.init.checkpoint = 'auto'  # auto | best | latest, each with :ema for the run's EMA

  c.teacher = ml_collections.ConfigDict()
  c.teacher.source = 'none'  # none | train | workdir | torch
  c.teacher.config = ''  # source=train: config file of the teacher stage (run in WORKDIR/teacher)
  c.teacher.path = ''  # source=workdir: a work directory of this project; torch: a .pt/.safetensors
  # source=torch: the checkpoint's architecture (empty name: read model.json beside the file).
  c.teacher.model = ml_collections.ConfigDict()
  c.teacher.model.name = ''
  c.teacher.model.base_width = 64
  c.teacher.model.width = 32
  c.teacher.checkpoint = 'auto'  # auto | best | latest, each with :ema for the run's EMA
  c.teacher.cache_logits = False  # precompute teacher logits once (needs data.augment=none)

  c.report = ml_collections.ConfigDict()
  c.report.baseline_workdir = ''  # a finished run to plot per-class accuracy beside
  c.report.plots = True  # the PNGs (False: tables and records only, for sweeps of many runs)

  c.eval = ml_collections.ConfigDict()
  c.eval.every_epochs = 1
  # From this epoch on (1-indexed, 0: never), evaluate every eval.late_every_epochs instead: the
  # released ABSLD script evaluates every 10 epochs before epoch 215 and every epoch after.
  c.eval.late_from_epoch = 0
  c.eval.late_every_epochs = 1
  c.eval.subset_size = 1000  # Periodic evaluation uses this many images of the selection split.
  c.eval.final_subset_size = 0  # Final evaluation: a stratified subset of the test set (0: all).
  c.eval.batch_size = 256
  c.eval.during_training = ('clean', 'pgd20')
  c.eval.final = EVAL_ATTACKS
  c.eval.selection = 'robust'  # robust: max avg PGD-20; fair: max avg + worst PGD-20; last.
  c.eval.selection_split = 'test'  # test | val (needs data.val_size > 0).
  # L-inf eps of every evaluation attack (FGSM, PGD-20, CW, AutoAttack, the audit's reference);
  # None: the training eps. Cross-method tables evaluate every model at one eps (8/255 on CIFAR).
  c.eval.eps = ml_collections.config_dict.placeholder(float)
  c.eval.alpha = 2 / 255
  c.eval.pgd_steps = 20
  c.eval.cw_steps = 30
  c.eval.cw_kappa = 50.0
  # PGD-20 and CW written out step by step (True) or looped (False); None takes the backend's
  # default (attacks.UNROLL_DEFAULTS: looped on CPU, where digits runs are compile-bound, while a
  # ResNet-18 evaluation ran 2.7x faster unrolled for ~9 s more compile: benchmarks/README.md).
  # The audit's PGD-100 x restarts always loops.
  c.eval.unroll = ml_collections.config_dict.placeholder(bool)

  # --mode=autoattack: the official AutoAttack (pyautoattack) on the exported PyTorch model.
  c.autoattack = ml_collections.ConfigDict()
  c.autoattack.version = 'standard'  # standard | plus | rand
  c.autoattack.n_examples = 0  # 0: the final evaluation's images (eval.final_subset_size)
  c.autoattack.batch_size = 500
  c.autoattack.device = 'auto'  # auto (cuda when available) | cpu | cuda | cuda:N

  # --mode=audit: the gradient-masking audit of a checkpoint (ltd_jax/audit.py).
  c.audit = ml_collections.ConfigDict()
  c.audit.n_examples = 1000  # stratified test subset (0: all)
  c.audit.eps_multiples = (0.25, 0.5, 1.0, 2.0, 4.0)  # PGD-20 at these multiples of eps
  c.audit.large_eps = 0.5  # PGD at this eps must leave about 0 accuracy ...
  c.audit.large_eps_max_accuracy = 0.05  # ... at most this much
  c.audit.pgd_steps = 100  # the stronger PGD: this many steps ...
  c.audit.restarts = 5  # ... from this many random starts
  c.audit.square_queries = 1000  # black-box Square attack (AutoAttack uses 5000)
  c.audit.square_p_init = 0.8
  c.audit.tolerance = 0.02  # accuracy differences below this are sampling noise

  # An exponential moving average of the weights (Gowal et al. 2020; Wang et al. 2023's
  # train-wa.py, ltd_jax/weight_average.py), evaluated, selected and exported beside them
  # (--checkpoint=best:ema). decay 0: none. The code's tau; its EMA is a copy of the weights for
  # the first warmup_fraction of the run's steps, then decays with min(decay, (1+d)/(10+d)).
  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.0
  c.ema.warmup_fraction = 0.025
  c.ema.dynamic_decay = True

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 3
  c.checkpoint.every_steps = 0  # 0: at the end of every epoch only.

  # Replay the reference code's extra train-mode forwards (statistics only, no gradient, one
  # forward pass) so that BatchNorm's running statistics are the reference's: TRADES runs clean,
  # adv, clean; TRADES-AWP adv, clean, clean (methods.Method.reference_bn_passes). The gradient is
  # the same either way; evaluation-mode numbers are not.
  c.reference_bn_passes = False

  c.log_every_steps = 20
  c.progress_bar = True
  # (start, stop): a JAX profiler trace of steps start .. stop - 1 in WORKDIR/profile.
  c.profile = ml_collections.ConfigDict()
  c.profile.steps = ()

  # --mode=compile: the run's steps compiled for an accelerator that is not here
  # (ltd_jax/compile_plan.py, docs/gpu_plan.md).
  c.compile = ml_collections.ConfigDict()
  c.compile.target = 'h200'  # ltd_jax/targets.py: h100 | h200 | a100 | rtx3090 | tpu-v5e | tpu-v5p
  c.compile.devices_per_host = 1  # GPUs per host (a TPU target: its topology's chips)
  c.compile.hosts = 1
  c.compile.memory_fraction = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION
  c.compile.workspace_margin_gib = 1.0  # for the cuDNN workspaces a compile does not see
  c.compile.mfu = 0.4  # the second time estimate runs at this fraction of the peak
  c.compile.flops = True  # FLOPs per image and the run's time (CPU lowerings, no compile)
  c.compile.max_batch = False  # also search the largest global batch that fits (tens of compiles)
  return c


def eval_eps(config) -> float:
  """The eps of evaluation attacks: ``eval.eps``, else the training ``eps``."""
  return float(config.eps if config.eval.eps is None else config.eval.eps)


def for_platform(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose attack loop forms (``attack.unroll``, ``eval.unroll``) left at
  None take the defaults of ``platform`` (``attacks.UNROLL_DEFAULTS``)."""
  if config.attack.unroll is not None and config.eval.unroll is not None:
    return config
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.attack.unroll = attacks.resolve_unroll(c.attack.unroll, 'train', platform)
    c.eval.unroll = attacks.resolve_unroll(c.eval.unroll, 'eval', platform)
  return c


BUNDLED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')


def split_config_spec(spec: str) -> tuple[str, str | None]:
  """``'x.py:arg'`` -> ``('x.py', 'arg')``; ``'NAME:arg'`` -> ``('NAME', 'arg')`` (a bundled
  config by name); no argument -> ``(spec, None)``."""
  if '.py' in spec:
    path, sep, arg = spec.partition('.py:')
    return (path + '.py', arg) if sep else (spec, None)
  name, _, arg = spec.partition(':')
  return name, arg or None


def bundled_configs() -> dict[str, str]:
  """The configs shipped in ``ltd_jax/configs``: name -> the first line of its docstring."""
  out = {}
  for path in sorted(glob.glob(os.path.join(BUNDLED_DIR, '*.py'))):
    name = os.path.splitext(os.path.basename(path))[0]
    if name.startswith('_'):
      continue
    with open(path) as f:
      doc = ast.get_docstring(ast.parse(f.read())) or ''
    line = ' '.join(doc.split('\n\n')[0].split())
    out[name] = line if len(line) <= 100 else line[:100].rsplit(' ', 1)[0] + ' ...'
  return out


def resolve_config_spec(spec: str) -> tuple[str, str | None]:
  """The file and argument of ``spec``: a bundled config's name (``absld_digits[:VARIANT]``) or
  a path to a ``.py`` file (relative to the working directory; ``configs/NAME.py``, which older
  work directories record, falls back to the bundled copy)."""
  path, arg = split_config_spec(spec)
  if path.endswith('.py'):
    if os.path.isfile(path):
      return os.path.realpath(path), arg
    bundled = os.path.join(BUNDLED_DIR, os.path.basename(path))
    if not os.path.isabs(path) and os.path.dirname(os.path.normpath(path)) == 'configs' and (
        os.path.isfile(bundled)):
      return bundled, arg
    raise ConfigError(f'config file {path} not found: pass a bundled config by name '
                      f'(--config=NAME, ltd-jax --list-configs lists them) or a path to a .py file')
  bundled = os.path.join(BUNDLED_DIR, path + '.py')
  if os.path.sep not in path and os.path.isfile(bundled):
    return bundled, arg
  close = difflib.get_close_matches(path, list(bundled_configs()), n=1)
  hint = f'did you mean {close[0]}? ' if close else ''
  raise ConfigError(f'unknown config {path!r}: {hint}ltd-jax --list-configs lists the bundled '
                    f'ones; a file of your own is passed by its path (NAME.py)')


def check_variant(variant, variants) -> None:
  """For config files' ``get_config(variant)``: a variant they do not define is a ConfigError."""
  if variant is not None and variant not in variants:
    raise ConfigError(f'unknown config variant {variant!r}: use one of {", ".join(variants)} '
                      f'(--config=NAME:{variants[0]}) or none')


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Imports the config of ``spec`` (a bundled name or a path, either with ``:arg``) and returns
  its ``get_config()`` (``get_config(arg)`` with an argument), as ml_collections' config flags
  do. The file's folder goes on ``sys.path`` so that it may import its neighbours; bundled
  configs import each other as ``ltd_jax.configs.NAME``."""
  path, arg = resolve_config_spec(spec)
  folder = os.path.dirname(path)
  if folder != BUNDLED_DIR and folder not in sys.path:
    sys.path.insert(0, folder)
  module_spec = importlib.util.spec_from_file_location('ltd_jax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
      raise ConfigError(f'config file {path} defines no get_config()')
    return module.get_config() if arg is None else module.get_config(arg)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    where = f' (line {e.lineno})' if isinstance(e, SyntaxError) else ''
    raise ConfigError(f'config file {path} failed to load{where}: {type(e).__name__}: '
                      f'{str(e).splitlines()[0] if str(e) else ""}; fix the file') from e


def _flat_keys(config, prefix=''):
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys += _flat_keys(v, prefix + k + '.')
  return keys


# Names other code bases use for keys of this config, for the suggestion of a mistyped key.
_ALIASES = {'learning_rate': 'lr', 'epochs': 'num_epochs', 'wd': 'weight_decay',
            'bs': 'batch_size', 'epsilon': 'eps', 'step_size': 'alpha', 'num_steps': 'steps',
            'arch': 'name', 'model_name': 'name'}


def check_override_keys(config: ml_collections.ConfigDict, argv) -> None:
  """Fails on any ``--config.a.b=v`` whose key the config does not define."""
  known = set(_flat_keys(config))
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if key not in known:
        *section, leaf = key.split('.')
        alias = '.'.join(section + [_ALIASES.get(leaf, leaf)])
        close = [alias] if alias in known else difflib.get_close_matches(key, sorted(known), n=1)
        hint = f'did you mean --config.{close[0]}?' if close else 'see configs/ and ltd_jax/config_lib.py'
        raise ConfigError(f'unknown config key {key!r} in {arg}: {hint}')


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first impossible value and how to fix it."""
  _require(config.method in methods.METHODS,
           f'unknown method {config.method!r}: set --config.method to one of '
           f'{", ".join(sorted(methods.METHODS))}')
  _require(config.eps >= 0, f'eps must be >= 0, got {config.eps}')
  _require(config.eps <= 1, f'eps={config.eps} exceeds 1, but pixels lie in [0, 1]: did you mean '
                            f'{config.eps:g}/255 (--config.eps={config.eps / 255:.6f})?')
  e = config.eval.eps
  if e is not None:
    _require(0 <= e <= 1, f'eval.eps={e} is not in [0, 1]: pixels lie in [0, 1]; did you mean '
                          f'{e:g}/255 (--config.eval.eps={e / 255:.6f})?')
  _require(config.attack.alpha > 0, f'attack.alpha must be > 0, got {config.attack.alpha}')
  _require(config.attack.steps >= 0, f'attack.steps must be >= 0, got {config.attack.steps}')
  _require(config.attack.init in attacks.INITS,
           f'attack.init must be one of {", ".join(attacks.INITS)}, got {config.attack.init!r}')
  _require(config.attack.bn_mode in ('eval', 'train', 'batch'),
           f'attack.bn_mode must be eval, train or batch, got {config.attack.bn_mode!r}')
  _require(config.batch_size > 0, f'batch_size must be > 0, got {config.batch_size}')
  _require(config.eval.batch_size > 0, f'eval.batch_size must be > 0, got {config.eval.batch_size}')
  _require(config.num_epochs >= 0, f'num_epochs must be >= 0, got {config.num_epochs}')
  _require(config.max_steps >= 0, f'max_steps must be >= 0, got {config.max_steps}')
  _require(config.optim.lr > 0, f'optim.lr must be > 0, got {config.optim.lr}')
  o = config.optim
  _require(o.schedule in ('piecewise', 'cosine'),
           f'optim.schedule must be piecewise or cosine, got {o.schedule!r}')
  _require(0.0 < o.cosine_warmup_fraction < 1.0 and o.cosine_per in ('epoch', 'step')
           and o.cosine_initial_div > 0 and o.cosine_final_div > 0,
           'optim.cosine_warmup_fraction must lie in (0, 1), cosine_per be epoch or step and the '
           'cosine divisors be > 0')
  _require(len(o.cycle_momentum) in (0, 2) and all(0 <= m < 1 for m in o.cycle_momentum),
           f'optim.cycle_momentum must be () or (low, high) in [0, 1), got {tuple(o.cycle_momentum)}')
  _require(o.schedule != 'cosine' or o.cosine_per == 'step'
           or o.cosine_warmup_fraction * config.num_epochs > 1.0,
           f'optim.cosine_warmup_fraction={o.cosine_warmup_fraction} of {config.num_epochs} epochs '
           f'is not more than one epoch (PyTorch OneCycleLR divides by zero there): raise it, or '
           f'set optim.cosine_per=step')
  k = config.optim.accumulation_steps
  _require(isinstance(k, int) and k >= 1 and config.batch_size % k == 0,
           f'optim.accumulation_steps={k} must be a positive divisor of batch_size='
           f'{config.batch_size}')
  if k > 1:
    method = methods.get_method(config.method) if config.method in methods.METHODS else None
    _require(method is None or not method.uses_awp(config),
             f'{config.method} perturbs the weights once per batch from its proxy gradient: '
             f'AWP with optim.accumulation_steps > 1 is not supported; set it to 1')
    _require(method is None or not (config.reference_bn_passes and method.post_update_bn_passes),
             f'{config.method} replays a forward of the whole batch after the update '
             f'(reference_bn_passes): set --config.reference_bn_passes=False or '
             f'optim.accumulation_steps=1')
  _require(config.optim.weight_decay >= 0,
           f'optim.weight_decay must be >= 0, got {config.optim.weight_decay}')
  _require(config.optim.warmup_epochs >= 0,
           f'optim.warmup_epochs must be >= 0, got {config.optim.warmup_epochs}')
  b = tuple(config.optim.lr_boundaries_epochs)
  _require(list(b) == sorted(b) and all(e >= 0 for e in b),
           f'optim.lr_boundaries_epochs must be non-negative and increasing, got {b}')
  _require(config.dtype in ('float32', 'bfloat16'),
           f'dtype must be float32 or bfloat16, got {config.dtype!r}')
  _require(config.data.source in ('auto', 'pickle', 'tfds', 'folder'),
           f'data.source must be auto, pickle, tfds or folder, got {config.data.source!r}')
  if config.data.get('checksum', ''):
    try:
      download.parse_checksum(config.data.checksum)
    except errors.DatasetError as e:
      raise ConfigError(f'data.{e}') from e
  _require(not config.data.get('url', '') or config.data.url.startswith(
      ('http://', 'https://', 'file://')),
           f'data.url must be an http(s):// or file:// URL, got {config.data.get("url")!r}')
  _require(config.data.name in datasets.REGISTRY,
           f'unknown dataset {config.data.name!r}: set --config.data.name to one of '
           f'{", ".join(sorted(datasets.REGISTRY))}')
  _require(config.data.val_size >= 0, f'data.val_size must be >= 0, got {config.data.val_size}')
  augmentations = ('auto', *datasets.AUGMENTATIONS)
  _require(config.data.augment in augmentations,
           f'data.augment must be one of {", ".join(augmentations)}, got {config.data.augment!r}')
  for key in ('during_training', 'final'):
    unknown = [a for a in config.eval[key] if a not in EVAL_ATTACKS]
    _require(not unknown, f'eval.{key} has unknown attacks {unknown}: use {EVAL_ATTACKS}')
  _require(config.eval.selection in SELECTIONS,
           f'eval.selection must be one of {SELECTIONS}, got {config.eval.selection!r}')
  if config.eval.selection != 'last':
    _require('pgd20' in config.eval.during_training,
             f'eval.selection={config.eval.selection} needs pgd20 in eval.during_training')
  _require(config.eval.selection_split in ('test', 'val'),
           f'eval.selection_split must be test or val, got {config.eval.selection_split!r}')
  _require(config.eval.selection_split != 'val' or config.data.val_size > 0,
           'eval.selection_split=val needs a validation split: set --config.data.val_size=N')
  _require(config.eval.every_epochs > 0, f'eval.every_epochs must be > 0')
  _require(config.eval.late_every_epochs > 0 and config.eval.late_from_epoch >= 0,
           'eval.late_every_epochs must be > 0 and eval.late_from_epoch >= 0')
  _require(config.ltd.base in ('trades', 'awp'), f'ltd.base must be trades or awp, got {config.ltd.base!r}')
  _require(config.absld.risk in ('mean', 'sum'), f'absld.risk must be mean or sum, got '
                                                f'{config.absld.risk!r}')
  _require(config.awp.proxy_loss in ('trades', 'method'),
           f'awp.proxy_loss must be trades or method, got {config.awp.proxy_loss!r}')
  _require(config.ltd.teacher_temperature > 0 and config.ltd.student_temperature > 0,
           'ltd temperatures must be > 0')
  batch_reductions = tuple(r for r in losses.REDUCTIONS if r != 'none')
  _require(config.rslad.reduction in batch_reductions,
           f'rslad.reduction must be one of {", ".join(batch_reductions)}, got '
           f'{config.rslad.reduction!r}')
  _require(0 <= config.rslad.alpha <= 1, f'rslad.alpha must lie in [0, 1], got {config.rslad.alpha}')
  a = config.absld
  _require(0 < a.tau_min <= a.tau_max,
           f'absld.tau_min ({a.tau_min}) must be > 0 and <= absld.tau_max ({a.tau_max})')
  _require(a.tau_min <= a.tau_init <= a.tau_max,
           f'absld.tau_init ({a.tau_init}) must lie in [tau_min, tau_max] = [{a.tau_min}, {a.tau_max}]')
  _require(a.beta >= 0, f'absld.beta must be >= 0, got {a.beta}')
  hard = tuple(a.manual_hard_classes)
  _require(all(isinstance(k, int) and k >= 0 for k in hard) and len(set(hard)) == len(hard),
           f'absld.manual_hard_classes must be distinct class indices, got {hard}')
  if config.data.name in datasets.REGISTRY:
    n = datasets.REGISTRY[config.data.name].num_classes
    _require(all(k < n for k in hard), f'absld.manual_hard_classes {hard} names classes outside '
                                       f'0..{n - 1} of {config.data.name}')
  _require(a.manual_hard_temperature > 0 and a.manual_easy_temperature > 0,
           'absld.manual_hard_temperature and absld.manual_easy_temperature must be > 0')
  _require(config.adaad.reduction in batch_reductions,
           f'adaad.reduction must be one of {", ".join(batch_reductions)}, got '
           f'{config.adaad.reduction!r}')
  _require(0 <= config.adaad.alpha <= 1, f'adaad.alpha must lie in [0, 1], got {config.adaad.alpha}')
  _require(config.ard.reduction in batch_reductions,
           f'ard.reduction must be one of {", ".join(batch_reductions)}, got {config.ard.reduction!r}')
  _require(0 <= config.ard.alpha <= 1 and config.ard.temperature > 0,
           'ard.alpha must lie in [0, 1] and ard.temperature be > 0')
  _require(config.iad.beta >= 0 and config.iad.begin_epoch >= 0,
           'iad.beta and iad.begin_epoch must be >= 0')
  f = config.fair
  _require(f.beta >= 0 and f.kappa_guard >= 0 and 0 < f.clip_min <= f.clip_max,
           'fair.beta and fair.kappa_guard must be >= 0 and 0 < fair.clip_min <= fair.clip_max')
  _require(config.bat.tau >= 0, f'bat.tau must be >= 0, got {config.bat.tau}')
  fr = config.frl
  _require(fr.step_size in ('max_eps_quarter', 'config'),
           f'frl.step_size must be max_eps_quarter or config, got {fr.step_size!r}')
  _require(fr.rate1 >= 0 and fr.rate2 >= 0 and fr.limit > 0 and fr.rate1_halve_every > 0
           and 0 < fr.margin_min <= fr.margin_max and fr.validation_pgd_steps > 0,
           'frl rates must be >= 0, frl.limit and frl.rate1_halve_every > 0, '
           '0 < frl.margin_min <= frl.margin_max, frl.validation_pgd_steps > 0')
  cf = config.cfa
  _require(cf.fawa_worst in ('worst', 'worst10'),
           f'cfa.fawa_worst must be worst or worst10, got {cf.fawa_worst!r}')
  _require(0 <= cf.fawa_decay < 1 and cf.begin_epoch >= 0 and cf.fawa_pgd_steps > 0,
           'cfa.fawa_decay must lie in [0, 1), cfa.begin_epoch >= 0, cfa.fawa_pgd_steps > 0')
  method = methods.METHODS.get(config.method)
  if method is not None and method.validation is not None:
    _require(config.data.val_size > 0,
             f'method {config.method} adapts to a held-out validation split: set '
             f'--config.data.val_size=N (e.g. 1000 of CIFAR-10, 100 per class)')
  for key in ('init', 'teacher'):
    which = config[key].checkpoint
    _require(which.split(':')[0] in ('auto', 'best', 'latest')
             and which.partition(':')[2] in ('', 'ema'),
             f'{key}.checkpoint must be auto, best or latest (optionally with :ema), got '
             f'{which!r}')
  _require(0.0 <= config.ema.decay < 1.0, f'ema.decay must lie in [0, 1) (0: no EMA), got '
           f'{config.ema.decay}')
  _require(0.0 <= config.ema.warmup_fraction <= 1.0,
           f'ema.warmup_fraction must lie in [0, 1], got {config.ema.warmup_fraction}')
  _require(not (config.ema.decay > 0 and methods.get_method(config.method).weight_average),
           f'{config.method} keeps its own weight average: set --config.ema.decay=0')
  _require(config.init.source in ('none', 'train', 'workdir'),
           f'init.source must be none, train or workdir, got {config.init.source!r}')
  _require(config.init.source != 'train' or config.init.config,
           'init.source=train needs --config.init.config=configs/NAME.py for the warm-start stage')
  _require(config.init.source != 'workdir' or config.init.path,
           'init.source=workdir needs --config.init.path=WORKDIR of a trained run')
  _require(config.awp.gamma >= 0 and config.awp.warmup_epochs >= 0, 'awp.gamma and awp.warmup_epochs must be >= 0')
  _require(config.teacher.source in TEACHER_SOURCES,
           f'teacher.source must be one of {", ".join(TEACHER_SOURCES)}, '
           f'got {config.teacher.source!r}')
  if methods.METHODS[config.method].needs_teacher:
    _require(config.teacher.source != 'none',
             f'method {config.method} distils from a teacher: set --config.teacher.source=train '
             f'(with teacher.config) or workdir (with teacher.path)')
  _require(config.teacher.source != 'train' or config.teacher.config,
           'teacher.source=train needs --config.teacher.config=configs/NAME.py for the teacher stage')
  _require(config.teacher.source != 'workdir' or config.teacher.path,
           'teacher.source=workdir needs --config.teacher.path=WORKDIR of a trained teacher')
  _require(config.teacher.source != 'torch' or config.teacher.path,
           'teacher.source=torch needs --config.teacher.path=FILE.pt (or .safetensors) and '
           '--config.teacher.model.name (e.g. wrn-34-10) unless model.json lies beside it')
  aa = config.autoattack
  _require(aa.version in ('standard', 'plus', 'rand'),
           f'autoattack.version must be standard, plus or rand, got {aa.version!r}')
  _require(aa.n_examples >= 0 and aa.batch_size > 0,
           'autoattack.n_examples must be >= 0 and autoattack.batch_size > 0')
  augment = config.data.augment
  if augment == 'auto':
    augment = datasets.default_augmentation(config.data.name)
  _require(not (config.teacher.cache_logits and methods.METHODS[config.method].teacher_on_inputs),
           f'method {config.method} runs the teacher on the images its attack makes, which no '
           f'cache holds: set --config.teacher.cache_logits=False')
  _require(not config.teacher.cache_logits or augment == 'none',
           'teacher.cache_logits caches one soft label per image: it needs --config.data.augment=none')
  d = config.data
  _require(0.0 <= d.generated_fraction < 1.0,
           f'data.generated_fraction must lie in [0, 1) (each batch keeps real images), got '
           f'{d.generated_fraction}')
  if d.generated_path:
    _require(not datasets.get(d.name).streaming,
             f'data.generated_path mixes generated images into an in-memory training set, not the '
             f'streamed {d.name}: use cifar10 or cifar100')
    _require(not config.teacher.cache_logits,
             'teacher.cache_logits holds one soft label per real image, none for the generated '
             'ones: set --config.teacher.cache_logits=False with data.generated_path')
  au = config.audit
  _require(1.0 in tuple(au.eps_multiples) and all(m > 0 for m in au.eps_multiples),
           f'audit.eps_multiples must be positive and include 1.0, got {tuple(au.eps_multiples)}')
  _require(au.pgd_steps > 0 and au.restarts > 0 and au.square_queries > 0 and au.n_examples >= 0,
           'audit.pgd_steps, audit.restarts and audit.square_queries must be > 0')
  _require(0 < au.large_eps <= 1 and 0 < au.square_p_init <= 1 and au.tolerance >= 0,
           'audit.large_eps and audit.square_p_init must lie in (0, 1], audit.tolerance >= 0')
  _require(config.checkpoint.keep > 0, f'checkpoint.keep must be > 0, got {config.checkpoint.keep}')
  _require(config.checkpoint.every_steps >= 0, 'checkpoint.every_steps must be >= 0')
  _require(config.log_every_steps > 0, 'log_every_steps must be > 0')
  cc = config.compile
  _require(cc.target in targets.TARGETS, f'unknown compile target {cc.target!r}: set '
           f'--config.compile.target to one of {", ".join(targets.TARGETS)}')
  _require(cc.devices_per_host > 0 and cc.hosts > 0,
           'compile.devices_per_host and compile.hosts must be > 0')
  _require(0 < cc.memory_fraction <= 1 and cc.workspace_margin_gib >= 0 and 0 < cc.mfu <= 1,
           'compile.memory_fraction and compile.mfu must lie in (0, 1], '
           'compile.workspace_margin_gib >= 0')
  p = tuple(config.profile.steps)
  _require(p == () or (len(p) == 2 and 0 <= p[0] < p[1]),
           f'profile.steps must be (start, stop) with 0 <= start < stop, or (), got {p}')
