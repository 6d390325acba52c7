"""Training methods as (adversary, loss) pairs over the one shared train step (METHODS.md
section 2), one module per family: ``adversarial`` (natural, PGD-AT, TRADES, AWP),
``distillation`` (LTD, RSLAD, ABSLD, ARD, IAD, AdaAD) and ``fairness`` (Fair-ARD, Fair-RSLAD,
BAT, FRL, CFA); ``base`` holds what they share and the registry (``METHODS``, ``register``,
``get_method``)."""

from ltd_jax.methods import adversarial
from ltd_jax.methods import distillation
from ltd_jax.methods import fairness
from ltd_jax.methods.adversarial import awp_loss, natural_loss, pgd_at_adversary, pgd_at_loss
from ltd_jax.methods.adversarial import trades_adversary, trades_loss
from ltd_jax.methods.base import (Aux, AttackStudent, METHODS, Method, MethodInputs, PlotSpec,
                                  TrainForward, class_values,
                                  get_method, validation_pgd, loss_aux, no_adversary,
                                  passes, per_class_sums, pgd, register)
from ltd_jax.methods.distillation import (absld_epoch_record, distillation_targets, ltd_awp_proxy_loss,
                                          ltd_loss, soft_label_natural_loss)
