"""The Colab notebooks (colab/*.ipynb) run top to bottom, and are committed without outputs.

Each notebook is executed by nbclient in a fresh ``python3`` kernel of this
interpreter (jupyter_client starts kernel specs whose command is ``python``
with ``sys.executable``), importing this checkout (PYTHONPATH), in a temporary
working directory, with ``LANGFLOW_NOTEBOOK_QUICK=1`` (the notebooks' own
short budget) and XLA's cheapest CPU compilation. The three run in order in
one directory, so the second and third reuse the quickstart's training run,
as they do for a user; any cell error fails the test.
"""

import os
import pathlib
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_installs_the_colab_way(path):
  first = nbformat.read(path, as_version=4).cells[1]  # after the title
  assert first.cell_type == "code"
  for needle in ('"google.colab" in sys.modules', "git", "clone", "pip", "install", "-e", "import langflow_jax"):
    assert needle in first.source, needle


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
