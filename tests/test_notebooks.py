"""The notebooks: each one in notebooks/ runs top to bottom on CPU without a network, and is stored clean.

Every notebook found by the glob is executed with nbclient in a fresh `python3` kernel whose working directory
is a temporary folder (so nothing a notebook writes lands in the repository), with CUDA hidden, Hugging Face
offline and HTTP(S) proxied to a closed port. A cell that raises fails the test with its source and traceback.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the colors of IPython tracebacks

# What the kernel sees on top of this process's environment: CPU only, and an HTTP(S) request made through the
# usual clients (urllib, requests, huggingface_hub) fails at once instead of reaching the network or hanging.
# The kernel itself talks to nbclient over local ZeroMQ sockets, which no proxy setting touches.
KERNEL_ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
    "PYTHONDONTWRITEBYTECODE": "1",
}


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def test_all_numbered_notebooks_are_there():
    numbers = {p.name[:2] for p in NOTEBOOKS}
    assert {f"{i:02d}" for i in range(1, 8)} <= numbers, f"notebooks found: {[p.name for p in NOTEBOOKS]}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} are stored with outputs or execution counts (store it clean)"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path: Path, tmp_path: Path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    started = time.perf_counter()
    try:
        client.execute(env={**os.environ, **KERNEL_ENV})
    except nbclient.exceptions.CellExecutionError as error:
        pytest.fail(f"{path.name}: a cell raised\n{ANSI.sub('', str(error))}", pytrace=False)
    except nbclient.exceptions.CellTimeoutError as error:
        pytest.fail(f"{path.name}: a cell ran longer than {CELL_TIMEOUT_S} s\n{error}", pytrace=False)
    elapsed = time.perf_counter() - started
    print(f"{path.name}: {elapsed:.1f} s")
    ran = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in ran), f"{path.name}: some code cells did not run"
    assert not list(tmp_path.glob("*.ipynb")), "a notebook wrote a notebook into its working directory"
