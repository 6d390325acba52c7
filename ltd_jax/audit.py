"""Gradient-masking audit of a checkpoint (``--mode=audit``).

A model can look robust because its gradients are useless to the attacker (saturated softmax,
shattered or stochastic gradients) rather than because it is robust (Athalye et al. 2018;
Carlini et al. 2019, "On evaluating adversarial robustness", section 5). The audit attacks the
same stratified test images in several ways and checks what must hold for a model whose
robustness is real:

1. accuracy does not rise as eps grows (PGD at ``audit.eps_multiples`` x eps);
2. it is about 0 at a large eps (``audit.large_eps``: the eps-ball reaches images of other
   classes, so only a broken attack leaves accuracy there);
3. more steps and random restarts do not raise it (PGD-``audit.pgd_steps`` x
   ``audit.restarts`` against PGD-20);
4. FGSM (one step) does not beat PGD;
5. a black-box attack that never sees a gradient (Square, ``audit.square_queries`` queries of
   the logits) does not beat white-box PGD;
6. no attack leaves accuracy above clean accuracy.

Comparisons allow ``audit.tolerance`` (sampling noise on a finite subset) except check 6.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ltd_jax import attacks
from ltd_jax import config_lib
from ltd_jax import evaluate
from ltd_jax import parallel
from ltd_jax import reports


def _pgd(logits_fn, x, y, rng, *, eps, alpha, steps, unroll=False):
  return attacks.pgd_attack(attacks.ce_objective(logits_fn, y), x, rng, eps=eps, alpha=alpha,
                            steps=steps, init='uniform', unroll=unroll)


def _pgd_restarts(logits_fn, x, y, rng, *, restarts, **kw):
  """The first restart's images, or where it fails, those of a restart that succeeds: correct
  under the returned images only if correct under every restart."""
  x_adv = _pgd(logits_fn, x, y, jax.random.fold_in(rng, 0), **kw)
  for r in range(1, restarts):
    wrong = jnp.argmax(logits_fn(x_adv), -1) != y
    x_r = _pgd(logits_fn, x, y, jax.random.fold_in(rng, r), **kw)
    x_adv = jnp.where(wrong[:, None, None, None], x_adv, x_r)
  return x_adv


def audit_attacks(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """``{name: {'eps', 'fn': (logits_fn, x, y, rng) -> x_adv, 'what'}}`` of every audit attack."""
  a, eps = config.audit, config_lib.eval_eps(config)
  ev = config.eval
  out = {'clean': {'eps': 0.0, 'what': 'no attack', 'fn': lambda f, x, y, r: x}}
  for m in a.eps_multiples:
    e = eps * m
    out[f'pgd{ev.pgd_steps}@{m:g}eps'] = {
        'eps': e, 'what': f'PGD-{ev.pgd_steps}, step {ev.alpha * m:.4g}',
        'fn': functools.partial(_pgd, eps=e, alpha=ev.alpha * m, steps=ev.pgd_steps,
                                unroll=attacks.resolve_unroll(ev.unroll, 'eval'))}
  out['fgsm'] = {
      'eps': eps, 'what': 'FGSM',
      'fn': lambda f, x, y, r: attacks.fgsm_attack(attacks.ce_objective(f, y), x, eps=eps)}
  out['pgd_strong'] = {
      'eps': eps, 'what': f'PGD-{a.pgd_steps} x {a.restarts} restarts, step {ev.alpha:.4g}',
      'fn': functools.partial(_pgd_restarts, eps=eps, alpha=ev.alpha, steps=a.pgd_steps,
                              restarts=a.restarts)}
  out['square'] = {
      'eps': eps, 'what': f'Square, {a.square_queries} queries (black box)',
      'fn': lambda f, x, y, r: attacks.square_attack(
          f, x, y, r, eps=eps, queries=a.square_queries, p_init=a.square_p_init)}
  large_alpha = 2.5 * a.large_eps / a.pgd_steps  # Madry et al.'s step for covering the ball
  out['pgd_large_eps'] = {
      'eps': a.large_eps, 'what': f'PGD-{a.pgd_steps}, step {large_alpha:.4g}',
      'fn': functools.partial(_pgd, eps=a.large_eps, alpha=large_alpha, steps=a.pgd_steps)}
  return out


def gradient_masking_checks(acc: dict[str, float], specs: dict[str, dict],
                            config: ml_collections.ConfigDict) -> list[dict]:
  """The six checks on the attacks' average accuracies: ``[{check, passed, evidence}]``."""
  a = config.audit
  tol = a.tolerance
  pgd = f'pgd{config.eval.pgd_steps}@1eps'
  sweep = ['clean'] + sorted((n for n in specs if '@' in n), key=lambda n: specs[n]['eps'])
  rises = [(p, n) for p, n in zip(sweep, sweep[1:]) if acc[n] > acc[p] + tol]
  pct = lambda n: f'{100 * acc[n]:.2f}%'
  white = min(acc[pgd], acc['pgd_strong'])
  above = [n for n in acc if n != 'clean' and acc[n] > acc['clean']]
  above_text = '; above it: ' + ', '.join(f'{n} {pct(n)}' for n in above) if above else ''
  return [
      {'check': 'accuracy falls as eps grows', 'passed': not rises,
       'evidence': ', '.join(f"{specs[n]['eps']:.4g}: {pct(n)}" for n in sweep)
                   + (f'; rises from {rises[0][0]} to {rises[0][1]}' if rises else '')},
      {'check': f'about 0 at a large eps ({a.large_eps:g})',
       'passed': acc['pgd_large_eps'] <= a.large_eps_max_accuracy,
       'evidence': f"PGD-{a.pgd_steps} at eps {a.large_eps:g}: {pct('pgd_large_eps')} "
                   f'(at most {100 * a.large_eps_max_accuracy:g}% allowed)'},
      {'check': 'more steps and restarts do not raise accuracy',
       'passed': acc['pgd_strong'] <= acc[pgd] + tol,
       'evidence': f"PGD-{config.eval.pgd_steps}: {pct(pgd)}; {specs['pgd_strong']['what']}: "
                   f"{pct('pgd_strong')}"},
      {'check': 'FGSM does not beat PGD', 'passed': acc['fgsm'] >= acc[pgd] - tol,
       'evidence': f"FGSM: {pct('fgsm')}; PGD-{config.eval.pgd_steps}: {pct(pgd)}"},
      {'check': 'black box (Square) does not beat white box (PGD)',
       'passed': acc['square'] >= white - tol,
       'evidence': f"Square: {pct('square')}; best white-box PGD: {100 * white:.2f}%"},
      {'check': 'no attack leaves accuracy above clean', 'passed': not above,
       'evidence': f"clean: {pct('clean')}{above_text}"},
  ]


def audit_model(apply_fn, variables, images: np.ndarray, labels: np.ndarray, num_classes: int,
                config: ml_collections.ConfigDict, rng: jax.Array, mesh=None) -> dict:
  """Runs every audit attack on ``images`` and the checks; returns the audit record."""
  specs = audit_attacks(config)
  step = evaluate.make_attack_eval_step(apply_fn, {n: s['fn'] for n, s in specs.items()})
  if mesh is not None:
    variables = parallel.replicate(variables, mesh)
  results = evaluate.evaluate(step, variables, images, labels, num_classes,
                              config.eval.batch_size, rng, mesh=mesh)
  acc = {n: r['avg'] for n, r in results.items()}
  checks = gradient_masking_checks(acc, specs, config)
  failed = [c['check'] for c in checks if not c['passed']]
  return {
      'verdict': ('gradient masking suspected: ' + '; '.join(failed)) if failed else
                 'passed: no sign of gradient masking',
      'passed': not failed, 'checks': checks, 'num_examples': int(len(labels)),
      'eps': config_lib.eval_eps(config), 'tolerance': float(config.audit.tolerance),
      'attacks': {n: {**results[n], 'eps': specs[n]['eps'], 'what': specs[n]['what']}
                  for n in specs},
  }


def audit_markdown(audit: dict) -> str:
  lines = [f"# Gradient-masking audit: {audit.get('title', '')}".rstrip(), '',
           f"Checkpoint: {audit.get('checkpoint', '?')}, {audit['num_examples']} test images, "
           f"eps = {audit['eps']:.5f}, tolerance {100 * audit['tolerance']:g} points.", '',
           f"**Verdict: {audit['verdict']}**", '']
  if not audit['passed']:
    lines += ['The PGD numbers of this model overstate its robustness (masked gradients, or an '
              'attack the loss surface misleads): quote the official AutoAttack '
              '(`--mode=autoattack`) and check the failing comparisons below.', '']
  lines += ['| check | verdict | evidence |', '|---|---|---|']
  for c in audit['checks']:
    lines.append(f"| {c['check']} | {'PASS' if c['passed'] else 'FAIL'} | {c['evidence']} |")
  lines += ['', '| attack | eps | what | accuracy % | worst class % |', '|---|---:|---|---:|---:|']
  for name, r in audit['attacks'].items():
    lines.append(f"| {name} | {r['eps']:.4g} | {r['what']} | {100 * r['avg']:.2f} | "
                 f"{100 * r['worst']:.2f} |")
  return '\n'.join(lines) + '\n'


def audit_checkpoint(config: ml_collections.ConfigDict, workdir: str, which: str = 'auto') -> dict:
  """``--mode=audit``: audits the checkpoint ``which`` of ``workdir`` (or a PyTorch file) on a
  stratified subset of ``audit.n_examples`` test images; writes audit.json / audit.md and
  adds the verdict to report.md."""
  from ltd_jax import runs  # pylint: disable=g-import-not-at-top
  ds, state, store = runs.restore_for_evaluation(config, workdir, which)
  try:
    state, which = runs.select_checkpoint(config, state, store, which)
  finally:
    store.close()
  images, labels = ds.split('test')
  subset = evaluate.stratified_subset(labels, config.audit.n_examples, config.seed)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 3)
  mesh = parallel.make_mesh()
  parallel.connect_hosts(mesh)
  record = audit_model(state.apply_fn, state.variables, images[subset], labels[subset],
                       ds.num_classes, config, rng, mesh=mesh)
  record.update(title=runs.run_title(config), checkpoint=which,
                step=None if runs.is_torch_file(which) else int(state.step))
  if parallel.is_primary():
    reports.write_json(os.path.join(workdir, 'audit.json'), record)
    md = audit_markdown(record)
    with open(os.path.join(workdir, 'audit.md'), 'w') as f:
      f.write(md)
    reports.write_report(workdir)
    print(md)
  return record
