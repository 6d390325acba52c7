"""Accelerators a run can be compiled for without one (``--mode=compile``): one entry per target.

A GPU target is the ``GpuTargetConfigProto`` that XLA:GPU compiles against (SM count, clocks,
shared memory, compute capability, cuDNN version) plus the peaks the time estimate divides by;
``jax.experimental.topologies.get_topology_desc(platform='cuda', target_config=...)`` turns it
into compile-only devices. The device facts follow XLA's own descriptions
(``xla/backends/gpu/target_config/specs``: h100_sxm, h200, a100_sxm_80) where they exist and the
vendor's spec sheet otherwise (RTX 3090); only the fields that the XLA of the pinned jax (0.10.2)
reads are written, and the cuDNN version is the installed one. Peaks are the spec sheets' dense
(no sparsity) tensor-core rates: bfloat16 with float32 accumulation, and TF32, the precision of a
float32 matmul or convolution under JAX's and PyTorch's defaults on these GPUs.

A TPU target is a libtpu topology name (``v5e:2x2``); its compile-only devices need ``libtpu``.
On TPU a float32 matmul runs as one bfloat16 pass by default, so both peaks are the bfloat16 one.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata

from ltd_jax.errors import ConfigError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class GpuFacts:
  """What XLA:GPU's cost model and code generation read of a device."""
  compute_capability: tuple[int, int]
  accelerated: bool  # sm_90a (Hopper's wgmma / TMA features), as XLA's H100 / H200 specs say
  core_count: int  # streaming multiprocessors
  fpus_per_core: int
  clock_rate_ghz: float
  memory_bandwidth: int  # bytes / s
  l2_cache_size: int
  shared_memory_per_core: int
  shared_memory_per_block_optin: int
  threads_per_core_limit: int


@dataclasses.dataclass(frozen=True)
class Target:
  """A device to compile for: ``memory_bytes`` per device, ``peak_flops[dtype]`` (FLOP/s, dense)
  and either ``gpu`` facts or a libtpu ``tpu_topology``."""
  name: str
  description: str
  memory_bytes: int
  peak_flops: dict
  source: str  # where the facts come from
  gpu: GpuFacts | None = None
  tpu_topology: str = ''
  devices_per_host: int = 8  # the usual host of this device (the multi-device plan)

  @property
  def platform(self) -> str:
    return 'cuda' if self.gpu is not None else 'tpu'


def installed_cudnn_version() -> tuple[int, int, int]:
  """The cuDNN of the installed CUDA wheels (what XLA would load on a real device)."""
  try:
    parts = importlib.metadata.version('nvidia-cudnn-cu12').split('.')
    return int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return 9, 8, 0  # the oldest cuDNN that the pinned jax's CUDA 12 plugin accepts


def gpu_target_config(target: Target) -> str:
  """The ``stream_executor.GpuTargetConfigProto`` text of ``target``."""
  g = target.gpu
  major, minor = g.compute_capability
  cudnn = installed_cudnn_version()
  extension = ' feature_extension: ACCELERATED_FEATURES' if g.accelerated else ''
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g.shared_memory_per_core}
  threads_per_core_limit: {g.threads_per_core_limit}
  core_count: {g.core_count}
  fpus_per_core: {g.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {g.memory_bandwidth}
  l2_cache_size: {g.l2_cache_size}
  clock_rate_ghz: {g.clock_rate_ghz}
  device_memory_size: {target.memory_bytes}
  shared_memory_per_block_optin: {g.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor}{extension} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}
device_description_str: "{target.description}"
"""


_HOPPER = dict(compute_capability=(9, 0), accelerated=True, core_count=132, fpus_per_core=128,
               clock_rate_ghz=1.98, l2_cache_size=50 * 2**20, shared_memory_per_core=233472,
               shared_memory_per_block_optin=232448, threads_per_core_limit=2048)

TARGETS: dict[str, Target] = {
    'h100': Target(
        'h100', 'NVIDIA H100 80GB HBM3', 84942979072,
        {'bfloat16': 989.4e12, 'float32': 494.7e12},
        'XLA specs/h100_sxm.txtpb; peaks: NVIDIA H100 SXM datasheet (dense)',
        gpu=GpuFacts(memory_bandwidth=3352320000000, **_HOPPER)),
    'h200': Target(
        'h200', 'NVIDIA H200 141GB HBM3e', 151397597184,
        {'bfloat16': 989.4e12, 'float32': 494.7e12},
        'XLA specs/h200.txtpb; peaks: NVIDIA H200 SXM datasheet (dense)',
        gpu=GpuFacts(memory_bandwidth=4800000000000, **_HOPPER)),
    'a100': Target(
        'a100', 'NVIDIA A100-SXM4-80GB', 85100068864,
        {'bfloat16': 312e12, 'float32': 156e12},
        'XLA specs/a100_sxm_80.txtpb; peaks: NVIDIA A100 datasheet (dense)',
        gpu=GpuFacts((8, 0), False, 108, 64, 1.41, 2039040000000, 40 * 2**20, 167936, 166912,
                     2048)),
    'rtx3090': Target(
        'rtx3090', 'NVIDIA GeForce RTX 3090', 24 * GIB,
        {'bfloat16': 71e12, 'float32': 35.6e12},
        'NVIDIA Ampere GA102 whitepaper (82 SMs, 1.695 GHz boost, 936 GB/s, 6 MB L2, 100 KB '
        'shared memory per SM; bf16 with fp32 accumulation 71 TFLOP/s, TF32 35.6 TFLOP/s)',
        gpu=GpuFacts((8, 6), False, 82, 128, 1.695, 936000000000, 6 * 2**20, 102400, 101376,
                     1536),
        devices_per_host=4),
    'tpu-v5e': Target(
        'tpu-v5e', 'TPU v5 lite (v5e)', 16 * GIB, {'bfloat16': 197e12, 'float32': 197e12},
        'Google Cloud TPU v5e documentation (16 GiB HBM, 197 TFLOP/s bf16 per chip)',
        tpu_topology='v5e:2x2', devices_per_host=4),
    'tpu-v5p': Target(
        'tpu-v5p', 'TPU v5p', 95 * GIB, {'bfloat16': 459e12, 'float32': 459e12},
        'Google Cloud TPU v5p documentation (95 GiB HBM, 459 TFLOP/s bf16 per chip)',
        tpu_topology='v5p:2x2x1', devices_per_host=4),
}


def get(name: str) -> Target:
  if name not in TARGETS:
    raise ConfigError(f'unknown compile target {name!r}: set --config.compile.target to one of '
                      f'{", ".join(TARGETS)}')
  return TARGETS[name]


def compile_only_devices(target: Target, devices_per_host: int = 1, hosts: int = 1) -> list:
  """``hosts`` x ``devices_per_host`` compile-only devices of ``target`` (a TPU target: the
  chips of its topology). Needs the CUDA plugin (``jax[cuda12]``) or ``libtpu`` installed;
  the local backend may stay the CPU (``JAX_PLATFORMS=cpu``)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    if target.gpu is not None:
      topology = topologies.get_topology_desc(
          platform='cuda', target_config=gpu_target_config(target),
          topology=f'1x{hosts}x{devices_per_host}')
    else:
      topology = topologies.get_topology_desc(target.tpu_topology, 'tpu')
  except Exception as e:  # pylint: disable=broad-except
    package = 'jax-cuda12-plugin (pip install "jax[cuda12]")' if target.gpu else (
        'libtpu (pip install "jax[tpu]")')
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise ConfigError(f'cannot compile for {target.name} here ({first[:200]}): install {package} '
                      f'of the installed jax version') from e
  return list(topology.devices)
