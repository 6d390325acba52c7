"""LTD on TRADES-AWP, CIFAR-10, WRN-34-10 (the setting of RobustBench's Chen2021LTD): AWP gamma
0.005 from (1-indexed) epoch 10, the proxy's ascent step at the lr (0.1) on the hard-label TRADES
loss, as the AWP code's calc_awp; forwards and BatchNorm statistics in the AWP code's order;
otherwise as ltd_trades_cifar10.py."""

from ltd_jax.configs import ltd_trades_cifar10


def get_config():
  c = ltd_trades_cifar10.get_config()
  c.ltd.base = 'awp'
  c.awp.gamma = 0.005
  c.awp.warmup_epochs = 10
  c.awp.proxy_lr = 0.1
  c.awp.proxy_loss = 'trades'
  return c
