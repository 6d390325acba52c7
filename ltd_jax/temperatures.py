"""ABSLD's per-class teacher temperatures (Zhao et al., ABSLD section 3.3, Eq. 10).

Each class k has a temperature for the adversarial targets (tau_adv) and one for the clean
targets (tau_clean). Over an epoch the train step accumulates the student's per-class
cross-entropy (its error risk R_k); at the epoch's end, separately for adv and clean,

    tau_k <- clip(tau_k - beta_t * (R_k - mean(R)) / max_j |R_j - mean(R)|, tau_min, tau_max)

so classes harder than average get lower temperatures (sharper soft labels). beta_t is beta
times lr_decay for every learning-rate milestone reached (``absld_beta``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def per_class_risk(risk_sum: jax.Array, risk_count: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-class mean risk and a mask of the classes seen this epoch (unbalanced data safe)."""
  seen = risk_count > 0
  return jnp.where(seen, risk_sum / jnp.maximum(risk_count, 1.0), 0.0), seen


def absld_update_temperatures(tau: jax.Array, risk_sum: jax.Array, risk_count: jax.Array,
                              beta_t, tau_min: float, tau_max: float,
                              rtol: float = 1e-6, risk: str = 'mean') -> jax.Array:
  """Eq. 10 on the classes seen this epoch; unseen classes keep their temperature.

  ``risk``: each class's mean cross-entropy (``mean``, METHODS.md: right for unbalanced data) or
  its sum (``sum``, the released script; the same update when every class has as many
  samples). The update is skipped when max|gap| is zero or rounding error relative to the risks
  (equal risks give gaps of ~1e-17 whose max-abs scaling would be +-1).
  """
  if risk == 'sum':
    risk_sum, risk_count = risk_sum, jnp.where(risk_count > 0, 1.0, 0.0)
  risk, seen = per_class_risk(risk_sum, risk_count)
  mean = jnp.sum(jnp.where(seen, risk, 0.0)) / jnp.maximum(jnp.sum(seen), 1)
  gap = jnp.where(seen, risk - mean, 0.0)
  max_gap = jnp.max(jnp.abs(gap))
  scale = jnp.maximum(jnp.max(jnp.abs(jnp.where(seen, risk, 0.0))), 1e-30)
  meaningful = max_gap > rtol * scale
  step = beta_t * gap / jnp.where(meaningful, max_gap, 1.0)
  updated = jnp.clip(tau - step, tau_min, tau_max)
  return jnp.where(meaningful, updated, tau)


def absld_beta(epochs_completed, base_beta: float, lr_boundaries_epochs, decay: float):
  """beta_t of the update that ends epoch ``epochs_completed`` (1-indexed): ``base_beta`` times
  ``decay`` for every lr milestone reached, that epoch's included. As in the released ABSLD
  script, which decays the lr and beta together at the end of epochs 215, 260 and 285, before
  that epoch's temperature update: the update ending epoch 215 already uses beta / 10."""
  passed = sum(jnp.asarray(epochs_completed >= b, jnp.float32) for b in lr_boundaries_epochs)
  return base_beta * jnp.power(decay, passed)


def class_temperatures(labels: jax.Array, tau_adv: jax.Array, tau_clean: jax.Array,
                       released_code_aliasing: bool = False) -> tuple[jax.Array, jax.Array]:
  """Each sample's [B, 1] temperatures (adv, clean) from its own class.

  With ``released_code_aliasing`` both are tau_adv[y] * tau_clean[y]: in the released ABSLD
  script the two scaled logits share storage, so both divisions apply to both targets.
  """
  t_adv, t_clean = tau_adv[labels][:, None], tau_clean[labels][:, None]
  if released_code_aliasing:
    both = t_adv * t_clean
    return both, both
  return t_adv, t_clean
