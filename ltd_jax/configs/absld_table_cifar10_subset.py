"""The ABSLD Table 1 and Table 6 rows of absld_table_cifar10.py on the real CIFAR-10 subset
(``ROW_subset``: width-8 small CNN students, the subset's TRADES teacher, its scaled schedule):
``python scripts/compare_methods.py --rows=configs/absld_table_cifar10_subset.py ...``."""

from ltd_jax.configs import absld_table_cifar10

ROWS = absld_table_cifar10.ROWS


def get_config(row='absld'):
  return absld_table_cifar10.get_config(f'{row}_subset')
