"""The Colab notebooks (colab/*.ipynb) run top to bottom, and are committed without outputs.

Each notebook is executed by nbclient in a fresh ``python3`` kernel of this
interpreter (jupyter_client starts kernel specs whose command is ``python``
with ``sys.executable``), importing this checkout (PYTHONPATH), in a temporary
working directory, with ``LANGFLOW_NOTEBOOK_QUICK=1`` (the notebooks' own
short budget) and XLA's cheapest CPU compilation. The three run in order in
one directory, so the second and third reuse the quickstart's training run,
as they do for a user; any cell error fails the test. The first code cell (the same in the three)
finds the checkout around the notebook, or clones and installs the package in Colab; it is also run
alone from a folder of a stand-in checkout, to see that the checkout is found without PYTHONPATH.
"""

import os
import pathlib
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import FAST_COMPILE

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


def test_the_three_notebooks_exist():
  assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_likelihood.ipynb",
                                         "03_own_data_and_official_weights.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


def first_code_cell(path: pathlib.Path) -> str:
  return next(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_finds_the_checkout_or_installs_the_colab_way(path):
  cells = nbformat.read(path, as_version=4).cells
  assert cells[0].cell_type == "markdown" and cells[1].cell_type == "code"  # the title, then the set-up
  first = cells[1].source
  for needle in ("pyproject.toml", "Path.cwd()", '"google.colab" in sys.modules', "git", "clone", "pip", "install",
                 "-e", "REPO_URL", "import langflow_jax"):
    assert needle in first, needle
  assert first == first_code_cell(NOTEBOOKS[0]), "the three notebooks share one set-up cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_markdown_cell_comes_before_every_code_cell(path):
  cells = nbformat.read(path, as_version=4).cells
  bare = [i for i, c in enumerate(cells) if c.cell_type == "code" and (i == 0 or cells[i - 1].cell_type != "markdown")]
  assert not bare, f"{path.name}: code cells {bare} have no markdown cell before them saying what they do"


def test_the_first_cell_imports_the_checkout_it_is_run_in(tmp_path):
  """From colab/ of a stand-in checkout (this package linked in), with no PYTHONPATH: that checkout."""
  checkout = tmp_path / "checkout"
  (checkout / "colab").mkdir(parents=True)
  (checkout / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
  (checkout / "langflow_jax").symlink_to(ROOT / "langflow_jax")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  done = subprocess.run([sys.executable, "-c", first_code_cell(NOTEBOOKS[0])], cwd=checkout / "colab",
                        env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert f"from {checkout.resolve() / 'langflow_jax'}\n" in done.stdout, done.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("notebooks")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, workdir):
  nb = nbformat.read(path, as_version=4)
  env = {**os.environ, "PYTHONPATH": str(ROOT), "LANGFLOW_NOTEBOOK_QUICK": "1", "XLA_FLAGS": FAST_COMPILE,
         "JAX_PLATFORMS": "cpu", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
  client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}})
  client.execute(env=env)  # raises CellExecutionError on the first failing cell
  install = "".join(o.get("text", "") for o in nb.cells[1].outputs)
  assert str(ROOT / "langflow_jax") in install, install  # this checkout, not another install
  assert sys.executable  # the kernel is this interpreter (see the module docstring)
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert images >= (0 if path.stem.startswith("03") else 1), "no figure was drawn"
