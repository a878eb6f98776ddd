"""Two layers, arrows one way: library modules never import an application module.

The library knows arrays, models, configs and checkpoints (``model``, ``schedule``, ``diffusion``,
``objective``, ``likelihood``, ``sampling``, ``methods``, ``data/``, ``parallel``, ``checkpoint``,
``baselines/``, ...). Above it, one application module per user task goes from a run directory to
library calls to a report; ``cli`` is a thin parser over them. Imports are read from the source
(``ast``), those inside functions included, so a lazy import does not slip past.
"""

import ast
import pathlib
import sys

from tests.conftest import ROOT

PACKAGE = ROOT / "langflow_jax"
# One module per user task (and the command line over them); every other module is library.
APPLICATION = frozenset({"train", "evaluate", "sample", "genppl", "convert", "aot", "demo", "serve", "cli",
                         "notebook", "distill"})  # notebook: what the Colab notebooks share


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """The package's modules that ``path`` imports (``from langflow_jax import x`` names module x)."""
  name = module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      # ``from pkg import mod`` imports the module mod; ``from mod import name`` the module mod
      found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
  out = set()
  for target in found:
    while target and target not in known:
      target = target.rpartition(".")[0]
    if target and target != name and target != "langflow_jax":
      out.add(target)
  return out


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {name: imports(path, set(mods)) for name, path in mods.items()}


def is_application(name: str) -> bool:
  return name.split(".")[1] in APPLICATION if name.count(".") == 1 else False


def test_the_application_modules_exist():
  names = {n.split(".", 1)[1] for n in modules() if n.count(".") == 1}
  assert APPLICATION <= names, APPLICATION - names


def test_no_library_module_imports_an_application_module():
  bad = sorted(f"{name} imports {target}" for name, targets in graph().items() if not is_application(name)
               for target in targets if is_application(target))
  assert not bad, "library -> application imports:\n" + "\n".join(bad)


def test_the_library_has_no_import_cycle():
  g = {name: {t for t in targets if not is_application(t)} for name, targets in graph().items()
       if not is_application(name)}
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  cycles = []

  def visit(node: str, path: list[str]) -> None:
    state[node] = 1
    for nxt in sorted(g.get(node, ())):
      if state.get(nxt) == 1:
        cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 2

  for node in sorted(g):
    if node not in state:
      visit(node, [node])
  assert not cycles, "import cycles in the library:\n" + "\n".join(cycles)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
  pkg = tmp_path / "langflow_jax"
  (pkg / "data").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "data" / "__init__.py").write_text("")
  (pkg / "train.py").write_text("")
  (pkg / "model.py").write_text("def f():\n  from langflow_jax import train\n")
  (pkg / "data" / "a.py").write_text("from . import b\nfrom ..model import f\n")
  (pkg / "data" / "b.py").write_text("import langflow_jax.data.a\n")
  this = sys.modules[__name__]
  monkeypatch.setattr(this, "ROOT", tmp_path)
  monkeypatch.setattr(this, "PACKAGE", pkg)
  g = graph()
  assert g["langflow_jax.model"] == {"langflow_jax.train"}
  assert g["langflow_jax.data.a"] == {"langflow_jax.data.b", "langflow_jax.model"}
  assert g["langflow_jax.data.b"] == {"langflow_jax.data.a"}
