"""The package's layering, read from its source: every import goes down (or across) the layers, no
module imports one that imports it back, no mode imports another, and the loop names no method."""

import ast
import os
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'cm_jax')

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS = (
    ('base', ('errors', 'files', 'phases')),
    ('maths', ('karras', 'trigflow', 'consistency', 'sampling', 'editing', 'models', 'networks')),
    ('runtime', ('config_utils', 'sharding', 'checkpointing', 'data', 'datasets', 'outputs', 'teacher',
                 'evaluation', 'rundir')),
    ('methods', ('methods',)),
    ('experiment', ('experiment', 'trainer', 'inference')),
    ('evaluators', ('evaluators', 'edit_tasks', 'convert')),
    ('modes', ('modes',)),
)


def layer_of(module: str) -> int:
  """The layer of 'cm_jax.a.b' (by its first component under cm_jax)."""
  top = module.split('.')[1]
  for rank, (_, tops) in enumerate(LAYERS):
    if top in tops:
      return rank
  raise AssertionError(f'{module} is in no layer of tests/test_layout.py: add it to one.')


def package_imports() -> dict[str, set[str]]:
  """{module: the cm_jax modules it imports, at module level or inside functions}."""
  graph = {}
  for dirpath, _, filenames in os.walk(PACKAGE):
    for filename in filenames:
      if not filename.endswith('.py'):
        continue
      path = os.path.join(dirpath, filename)
      rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, '.')
      name = rel.removesuffix('.__init__')
      deps = set()
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
          deps |= {a.name for a in node.names if a.name.startswith('cm_jax.')}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('cm_jax'):
          # `from cm_jax import x` imports the module cm_jax.x; `from cm_jax.a import b` is cm_jax.a
          # (or its submodule b).
          deps |= {f'{node.module}.{a.name}' for a in node.names} | {node.module}
      graph[name] = deps
  modules = set(graph)
  return {m: {d for d in deps if d in modules and d not in ('cm_jax', m)} for m, deps in graph.items()}


def test_every_import_goes_down_the_layers():
  violations = [f'{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})'
                for m, deps in package_imports().items() if m != 'cm_jax'
                for d in deps if layer_of(d) > layer_of(m)]
  assert not violations, violations


def test_no_module_imports_one_that_imports_it_back():
  graph = package_imports()

  def reaches(start, goal, seen):
    for d in graph.get(start, ()):
      # A package's __init__ importing its own submodules is not a circle.
      if d == goal and not goal.startswith(start + '.') and not start.startswith(d + '.'):
        return True
      if d not in seen and not start.startswith(d + '.'):
        seen.add(d)
        if reaches(d, goal, seen):
          return True
    return False
  circles = [m for m in graph if m != 'cm_jax' and reaches(m, m, set())]
  assert not circles, circles


def test_no_mode_imports_another():
  graph = package_imports()
  modes = [m for m in graph if m.startswith('cm_jax.modes.')]
  assert sorted(modes) == ['cm_jax.modes.edit', 'cm_jax.modes.eval', 'cm_jax.modes.sample',
                           'cm_jax.modes.train']
  crossing = [(m, d) for m in modes for d in graph[m] if d.startswith('cm_jax.modes')]
  assert not crossing, crossing


@pytest.mark.parametrize('module', ['trainer.py', 'experiment.py'])
def test_the_loop_names_no_method_and_no_sampler(module):
  from cm_jax import karras, methods
  names = set(methods.names()) | set(karras.SOLVERS) | {'onestep', 'multistep', 'teacher_heun'}
  with open(os.path.join(PACKAGE, module)) as f:
    tree = ast.parse(f.read())
  named = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
           and isinstance(node.value, str)} | {node.id for node in ast.walk(tree)
                                                 if isinstance(node, ast.Name)}
  assert not names & named, names & named


def test_the_layering_test_can_fail(tmp_path, monkeypatch):
  """A maths module importing the trainer, and a circle, are both caught."""
  package = tmp_path / 'cm_jax'
  package.mkdir()
  for name, source in {'__init__.py': '', 'karras.py': 'from cm_jax import trainer\n',
                       'trainer.py': 'from cm_jax import karras\n'}.items():
    (package / name).write_text(source)
  monkeypatch.setattr(sys.modules[__name__], 'PACKAGE', str(package))
  with pytest.raises(AssertionError, match='karras .maths. imports cm_jax.trainer'):
    test_every_import_goes_down_the_layers()
  with pytest.raises(AssertionError, match='cm_jax.karras'):
    test_no_module_imports_one_that_imports_it_back()
