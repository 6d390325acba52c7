"""LTD on TRADES-AWP, CIFAR-10, WRN-34-10 (the setting of RobustBench's Chen2021LTD): AWP gamma
0.005 from epoch 10, proxy step 0.01, otherwise as ltd_trades_cifar10.py."""

from configs import ltd_trades_cifar10


def get_config():
  c = ltd_trades_cifar10.get_config()
  c.ltd.base = 'awp'
  c.awp.gamma = 0.005
  c.awp.warmup_epochs = 10
  c.awp.proxy_lr = 0.01
  return c
