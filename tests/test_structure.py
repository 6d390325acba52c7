"""The package's shape: no module imports another that imports it back (top-level or inside a
function), and the config's choices come from the registries they name."""

import ast
import os

import pytest

from ltd_jax import attacks
from ltd_jax import config_lib
from ltd_jax import datasets
from ltd_jax import losses
from ltd_jax import methods
from ltd_jax.errors import ConfigError
from tests.conftest import ROOT, make_tiny_config


def import_graph() -> dict[str, set[str]]:
  """{module: ltd_jax modules it imports anywhere in its source}; a subpackage (methods/) is
  one node, the union of its files, and ``ltd_jax.methods.base`` counts as ``methods``."""
  package = os.path.join(ROOT, 'ltd_jax')
  sources = {f[:-3]: [os.path.join(package, f)] for f in os.listdir(package)
             if f.endswith('.py') and f != '__init__.py'}
  for sub in os.listdir(package):
    folder = os.path.join(package, sub)
    if os.path.isfile(os.path.join(folder, '__init__.py')):
      sources[sub] = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith('.py')]
  names = set(sources)
  graph = {}
  for name in names:
    deps = set()
    for path in sources[name]:
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module == 'ltd_jax':
          deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('ltd_jax.'):
          deps.add(node.module.split('.')[1])
        elif isinstance(node, ast.Import):
          deps.update(a.name.split('.')[1] for a in node.names if a.name.startswith('ltd_jax.'))
    graph[name] = deps & names - {name}
  return graph


def cycles(graph):
  """Every import cycle, as a list of modules (depth-first search)."""
  found, state = [], {}

  def visit(node, path):
    state[node] = 'open'
    for dep in sorted(graph[node]):
      if state.get(dep) == 'open':
        found.append(path[path.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, path + [dep])
    state[node] = 'done'
  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return found


def test_no_import_cycles():
  graph = import_graph()
  assert 'train' in graph and 'runs' in graph['train']
  assert cycles(graph) == []
  # The detector sees a cycle when there is one.
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [['a', 'b', 'c', 'a']]


def test_modes_depend_on_the_run_library_not_on_the_training_loop():
  graph = import_graph()
  for mode in ('export', 'autoattack', 'audit'):
    assert 'runs' in graph[mode] and 'train' not in graph[mode], mode
  assert 'train' not in graph['runs']
  assert 'input_pipeline' not in graph['data']  # a dataset is read through the registry


@pytest.mark.parametrize('key,value,registry', [
    ('data.name', 'mnist', datasets.REGISTRY), ('method', 'mart', methods.METHODS),
    ('attack.init', 'gaussian', attacks.INITS), ('rslad.reduction', 'mean', losses.REDUCTIONS)])
def test_validate_takes_its_choices_from_the_registries(key, value, registry):
  config = make_tiny_config()
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=repr(value)):
    config_lib.validate(config)
  saved = dict(registry) if isinstance(registry, dict) else None
  if saved is None:
    return  # a tuple: the message lists it
  registry[value] = registry[next(iter(registry))]  # registered: now accepted
  try:
    config_lib.validate(config)
  finally:
    registry.clear()
    registry.update(saved)


def test_the_generic_loop_never_names_a_method():
  """No string in the training loop, the run library or the state is a registered method's
  name: what a method needs reaches them through the Method record."""
  for module in ('train', 'runs', 'state', 'evaluate', 'checkpoints'):
    tree = ast.parse(open(os.path.join(ROOT, 'ltd_jax', f'{module}.py')).read())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    assert not strings & set(methods.METHODS), (module, strings & set(methods.METHODS))


def test_the_methods_package_imports_downward_only():
  """base imports no family; adversarial only base; distillation base and adversarial;
  fairness any of them; no family imports the package's __init__."""
  folder = os.path.join(ROOT, 'ltd_jax', 'methods')
  allowed = {'base': set(), 'adversarial': {'base'}, 'distillation': {'base', 'adversarial'},
             'fairness': {'base', 'adversarial', 'distillation'}}
  for name, ok in allowed.items():
    tree = ast.parse(open(os.path.join(folder, f'{name}.py')).read())
    used = {n.module.split('.')[2] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            and (n.module or '').startswith('ltd_jax.methods.')}
    used |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
             and n.module == 'ltd_jax.methods' for a in n.names}
    assert used <= ok, (name, used - ok)
