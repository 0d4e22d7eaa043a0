"""No import circles among the modules of dim_jax/, read from their source (no import runs).

Every `import` counts, also those inside functions: a lazy import hides a circle from Python's
loader but not from a reader. `from pkg import name` is an edge to the module `pkg.name` when there
is one, else to `pkg`. Imports are absolute (a relative one fails the test).
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def module_names() -> dict[str, pathlib.Path]:
  names = {}
  for path in (ROOT / "dim_jax").rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return names


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        assert not node.level, f"{path}:{node.lineno}: use an absolute import"
        named = [f"{node.module}.{alias.name}" for alias in node.names]
        targets = [t if t in modules else node.module for t in named]
      else:
        continue
      edges.update(t for t in targets if t in modules and t != name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle as a list of modules (first = last), or None; depth-first search."""
  state, stack = {}, []  # state: 1 = on the current path, 2 = done

  def visit(node):
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_no_import_circles():
  cycle = find_cycle(import_graph(module_names()))
  assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_finds_a_circle_through_a_lazy_import():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycle(graph) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_reads_the_imports_of_this_tree():
  """The graph sees top-level, lazy and `from package import module` imports."""
  graph = import_graph(module_names())
  assert "dim_jax.parallel" in graph["dim_jax.train"]  # from dim_jax import parallel
  assert "dim_jax.data" in graph["dim_jax.train"]  # the package itself
  assert "dim_jax.models.vae" in graph["dim_jax.sample"]  # imported inside a function
