"""PyTorch definitions of every architecture, with the state_dict names of the references.

These let a user without RobustBench load an exported checkpoint and run it (AutoAttack runs on
them). Names and layer order follow ``shared/spec/torch_keys``: TRADES / RobustBench
``WideResNet``, kuangliu's ``ResNet18`` and ``MobileNetV2``, RobustBench's and AWP's
``PreActResNet18``, torchvision's ``resnet50`` / ``wide_resnet50_2``. Pooling is a global average, equal to the references' ``avg_pool2d`` over
the final map at 32x32 input and also defined for other input sizes (8x8 digits). Inputs are
NCHW float in [0, 1], without normalisation, as in RobustBench.

Importing this module needs torch (``pip install -r requirements-torch.txt``).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F


def _conv(in_planes: int, out_planes: int, kernel: int, stride: int = 1,
          groups: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_planes, out_planes, kernel, stride=stride, padding=kernel // 2,
                   groups=groups, bias=False)


def _pool(x: torch.Tensor) -> torch.Tensor:
  return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class WideBasicBlock(nn.Module):
  """Pre-activation WRN block; the 1x1 ``convShortcut`` sees relu(bn1(x)) when shapes differ."""

  def __init__(self, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.relu1 = nn.ReLU()
    self.conv1 = _conv(in_planes, out_planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu2 = nn.ReLU()
    self.conv2 = _conv(out_planes, out_planes, 3)
    self.equal_in_out = in_planes == out_planes
    self.convShortcut = None if self.equal_in_out else _conv(in_planes, out_planes, 1, stride)

  def forward(self, x):
    o = self.relu1(self.bn1(x))
    shortcut = x if self.equal_in_out else self.convShortcut(o)
    o = self.conv2(self.relu2(self.bn2(self.conv1(o))))
    return shortcut + o


class NetworkBlock(nn.Module):
  def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.layer = nn.Sequential(*[
        WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
        for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):
  """WRN-depth-widen_factor with TRADES / RobustBench names (conv1, block1-3, bn1, fc)."""

  def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10,
               in_channels: int = 3):
    super().__init__()
    if (depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n+4, got {depth}')
    n = (depth - 4) // 6
    widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    self.conv1 = _conv(in_channels, widths[0], 3)
    self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
    self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
    self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.relu = nn.ReLU()
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    o = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(_pool(self.relu(self.bn1(o))))


# DeepMind's WRN input normalisation by class count (RobustBench dm_wide_resnet.py).
DM_NORMALIZATION = {10: ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
                    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


class DMWideBlock(nn.Module):
  """DeepMind's pre-activation WRN block: where the width changes, the 1x1 shortcut and conv_0
  take act(batchnorm_0(x)); conv_0 of stride 2 pads right and bottom only ('SAME')."""

  def __init__(self, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.batchnorm_0 = nn.BatchNorm2d(in_planes)
    self.relu_0 = nn.SiLU()
    self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
    self.batchnorm_1 = nn.BatchNorm2d(out_planes)
    self.relu_1 = nn.SiLU()
    self.conv_1 = _conv(out_planes, out_planes, 3)
    self.has_shortcut = in_planes != out_planes
    self.shortcut = (nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
                     if self.has_shortcut else None)
    self.pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

  def forward(self, x):
    out = self.relu_0(self.batchnorm_0(x))
    if self.has_shortcut:
      x = out
    out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(F.pad(out, self.pad)))))
    return (self.shortcut(x) if self.has_shortcut else x) + out


class DMWideGroup(nn.Module):
  def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.block = nn.Sequential(*[
        DMWideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
        for i in range(n)])

  def forward(self, x):
    return self.block(x)


class DMWideResNet(nn.Module):
  """DeepMind's WRN with SiLU (Gowal et al. 2020), keys as RobustBench's ``DMWideResNet``
  (init_conv, layer.G.block.I.{batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}, batchnorm,
  logits); normalises its input with the CIFAR-10 or CIFAR-100 statistics (not in the
  state_dict)."""

  def __init__(self, depth: int = 70, width: int = 16, num_classes: int = 10,
               in_channels: int = 3):
    super().__init__()
    if (depth - 4) % 6:
      raise ValueError(f'DMWideResNet depth must be 6n+4, got {depth}')
    mean, std = DM_NORMALIZATION[num_classes]
    self.register_buffer('mean', torch.tensor(mean).view(in_channels, 1, 1), persistent=False)
    self.register_buffer('std', torch.tensor(std).view(in_channels, 1, 1), persistent=False)
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    self.init_conv = _conv(in_channels, widths[0], 3)
    self.layer = nn.Sequential(*[DMWideGroup(n, widths[g], widths[g + 1], stride)
                                 for g, stride in enumerate((1, 2, 2))])
    self.batchnorm = nn.BatchNorm2d(widths[3])
    self.relu = nn.SiLU()
    self.logits = nn.Linear(widths[3], num_classes)

  def forward(self, x):
    out = self.layer(self.init_conv((x - self.mean) / self.std))
    return self.logits(_pool(self.relu(self.batchnorm(out))))


class BasicBlock(nn.Module):
  """Post-activation ResNet block (kuangliu); ``shortcut`` = Sequential(conv 1x1, BN) or empty."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = _conv(in_planes, planes, 3, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(_conv(in_planes, planes, 1, stride), nn.BatchNorm2d(planes))

  def forward(self, x):
    o = F.relu(self.bn1(self.conv1(x)))
    o = self.bn2(self.conv2(o))
    return F.relu(o + self.shortcut(x))


class PreActBlock(nn.Module):
  """Pre-activation block; ``shortcut`` = Sequential(conv 1x1) on relu(bn1(x)) when shapes differ."""

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.conv1 = _conv(in_planes, planes, 3, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3)
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(_conv(in_planes, planes, 1, stride))

  def forward(self, x):
    o = F.relu(self.bn1(x))
    shortcut = self.shortcut(o) if hasattr(self, 'shortcut') else x
    o = self.conv2(F.relu(self.bn2(self.conv1(o))))
    return o + shortcut


class ResNet(nn.Module):
  """CIFAR ResNet-18 (``block=BasicBlock``, 3x3 stem + BN) or PreActResNet-18 (``PreActBlock``,
  no stem BN; ``final_bn`` adds AWP's ``bn`` before pooling)."""

  def __init__(self, block, num_blocks=(2, 2, 2, 2), num_classes: int = 10, base_width: int = 64,
               in_channels: int = 3, final_bn: bool = False):
    super().__init__()
    self.preact = block is PreActBlock
    self.conv1 = _conv(in_channels, base_width, 3)
    if not self.preact:
      self.bn1 = nn.BatchNorm2d(base_width)
    in_planes = base_width
    for s, n in enumerate(num_blocks):
      planes = base_width * 2**s
      blocks = []
      for i in range(n):
        blocks.append(block(in_planes, planes, 2 if s > 0 and i == 0 else 1))
        in_planes = planes
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
    self.num_stages = len(num_blocks)
    if final_bn:
      self.bn = nn.BatchNorm2d(in_planes)
    self.linear = nn.Linear(in_planes, num_classes)

  def forward(self, x):
    o = self.conv1(x)
    if not self.preact:
      o = F.relu(self.bn1(o))
    for s in range(self.num_stages):
      o = getattr(self, f'layer{s + 1}')(o)
    if hasattr(self, 'bn'):
      o = F.relu(self.bn(o))
    return self.linear(_pool(o))


def ResNet18(num_classes: int = 10, base_width: int = 64, in_channels: int = 3) -> ResNet:  # pylint: disable=invalid-name
  return ResNet(BasicBlock, num_classes=num_classes, base_width=base_width,
                in_channels=in_channels)


def PreActResNet18(num_classes: int = 10, base_width: int = 64, in_channels: int = 3,  # pylint: disable=invalid-name
                   final_bn: bool = False) -> ResNet:
  return ResNet(PreActBlock, num_classes=num_classes, base_width=base_width,
                in_channels=in_channels, final_bn=final_bn)


class InvertedResidual(nn.Module):
  """MobileNetV2 block (kuangliu): expand 1x1, depthwise 3x3, project 1x1; residual at stride 1."""

  def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
    super().__init__()
    planes = expansion * in_planes
    self.stride = stride
    self.conv1 = _conv(in_planes, planes, 1)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv(planes, planes, 3, stride, groups=planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv(planes, out_planes, 1)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.shortcut = nn.Sequential()
    if stride == 1 and in_planes != out_planes:
      self.shortcut = nn.Sequential(_conv(in_planes, out_planes, 1), nn.BatchNorm2d(out_planes))

  def forward(self, x):
    o = F.relu(self.bn1(self.conv1(x)))
    o = F.relu(self.bn2(self.conv2(o)))
    o = self.bn3(self.conv3(o))
    return o + self.shortcut(x) if self.stride == 1 else o


# (expansion, out_planes, num_blocks, stride), the CIFAR variant (stride 1 in the second stage).
MOBILENETV2_CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                   (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(nn.Module):

  def __init__(self, num_classes: int = 10, in_channels: int = 3):
    super().__init__()
    self.conv1 = _conv(in_channels, 32, 3)
    self.bn1 = nn.BatchNorm2d(32)
    blocks, in_planes = [], 32
    for expansion, out_planes, n, stride in MOBILENETV2_CFG:
      for i in range(n):
        blocks.append(InvertedResidual(in_planes, out_planes, expansion, stride if i == 0 else 1))
        in_planes = out_planes
    self.layers = nn.Sequential(*blocks)
    self.conv2 = _conv(320, 1280, 1)
    self.bn2 = nn.BatchNorm2d(1280)
    self.linear = nn.Linear(1280, num_classes)

  def forward(self, x):
    o = self.layers(F.relu(self.bn1(self.conv1(x))))
    o = F.relu(self.bn2(self.conv2(o)))
    return self.linear(_pool(o))


class SmallCNN(nn.Module):
  """Three conv-BN-ReLU layers (widths w, 2w, 4w; strides 1, 2, 2) and a linear ``fc``."""

  def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1):
    super().__init__()
    widths = (in_channels, width, 2 * width, 4 * width)
    for i, stride in enumerate((1, 2, 2)):
      setattr(self, f'conv{i + 1}', _conv(widths[i], widths[i + 1], 3, stride))
      setattr(self, f'bn{i + 1}', nn.BatchNorm2d(widths[i + 1]))
    self.fc = nn.Linear(4 * width, num_classes)

  def forward(self, x):
    for i in range(1, 4):
      x = F.relu(getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x)))
    return self.fc(_pool(x))


class Bottleneck(nn.Module):
  """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 convolution)."""

  def __init__(self, in_planes: int, planes: int, stride: int, width: int):
    super().__init__()
    self.conv1, self.bn1 = _conv(in_planes, width, 1), nn.BatchNorm2d(width)
    self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
    self.conv3, self.bn3 = _conv(width, 4 * planes, 1), nn.BatchNorm2d(4 * planes)
    self.downsample = None
    if stride != 1 or in_planes != 4 * planes:
      self.downsample = nn.Sequential(_conv(in_planes, 4 * planes, 1, stride),
                                      nn.BatchNorm2d(4 * planes))

  def forward(self, x):
    o = F.relu(self.bn1(self.conv1(x)))
    o = F.relu(self.bn2(self.conv2(o)))
    o = self.bn3(self.conv3(o))
    return F.relu(o + (x if self.downsample is None else self.downsample(x)))


class ImageNetResNet(nn.Module):
  """torchvision's ``resnet50`` / ``wide_resnet50_2`` layout (same state_dict keys)."""

  def __init__(self, width_factor: int = 1, num_classes: int = 1000, in_channels: int = 3):
    super().__init__()
    self.conv1, self.bn1 = _conv(in_channels, 64, 7, 2), nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    in_planes = 64
    for s, n in enumerate((3, 4, 6, 3)):
      planes = 64 * 2**s
      blocks = []
      for i in range(n):
        blocks.append(Bottleneck(in_planes, planes, 2 if s > 0 and i == 0 else 1,
                                 planes * width_factor))
        in_planes = 4 * planes
      setattr(self, f'layer{s + 1}', nn.Sequential(*blocks))
    self.fc = nn.Linear(in_planes, num_classes)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    for s in range(1, 5):
      x = getattr(self, f'layer{s}')(x)
    return self.fc(_pool(x))


_WRN = re.compile(r'^wrn-(\d+)-(\d+)$')
_DM_WRN = re.compile(r'^dm-wrn-(\d+)-(\d+)$')


def build_torch_model(name: str, num_classes: int, in_channels: int = 3, base_width: int = 64,
                      width: int = 32) -> nn.Module:
  """The PyTorch twin of ``models.create_model(name, ...)``, in eval mode."""
  if name in ('resnet50', 'wrn-50-2'):
    model = ImageNetResNet(2 if name == 'wrn-50-2' else 1, num_classes, in_channels)
  elif m := _WRN.match(name):
    model = WideResNet(int(m.group(1)), int(m.group(2)), num_classes, in_channels)
  elif m := _DM_WRN.match(name):
    model = DMWideResNet(int(m.group(1)), int(m.group(2)), num_classes, in_channels)
  elif name == 'resnet18':
    model = ResNet18(num_classes, base_width, in_channels)
  elif name in ('preactresnet18', 'preactresnet18-bn'):
    model = PreActResNet18(num_classes, base_width, in_channels, final_bn=name.endswith('-bn'))
  elif name == 'preactresnet34':
    model = ResNet(PreActBlock, (3, 4, 6, 3), num_classes=num_classes, base_width=base_width,
                   in_channels=in_channels)
  elif name == 'mobilenetv2':
    model = MobileNetV2(num_classes, in_channels)
  elif name == 'small_cnn':
    model = SmallCNN(width, num_classes, in_channels)
  else:
    raise ValueError(f'no PyTorch definition for model {name!r}')
  return model.eval()
