"""Every notebook in notebooks/ is committed with its outputs (figures included) and runs top to bottom
(small settings) without error, its figures showing again."""
from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _figures(nb) -> list[int]:
    """The code cells (their index among the code cells) with a PNG among their outputs."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    return [k for k, c in enumerate(code) if any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_with_its_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # executed top to bottom, once, in order; no error kept
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path.name}: run it top to bottom"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert _figures(nb), f"{path.name}: no figure among its outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_figures_show(path, monkeypatch):
    monkeypatch.setenv("CAPSIM_NOTEBOOK_SMALL", "1")
    # The kernel's own backend (matplotlib-inline, headless): what a notebook user has.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    committed = nbformat.read(path, as_version=4)
    nb = copy.deepcopy(committed)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    # every cell that showed a figure when committed shows one again
    assert set(_figures(committed)) <= set(_figures(nb)), path.name


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless browser: none of chromium, chromium-browser, "
                                                "google-chrome is on PATH (apt-get install chromium)")
def test_committed_figures_render_in_chromium(tmp_path):
    # Each notebook's figures as a page of embedded PNGs, with the report's script that counts the images the
    # browser decoded: every figure committed is a picture a browser (Jupyter's, GitHub's) can show.
    from sim.report.html import _SCRIPT

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        imgs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if "image/png" in o.get("data", {})]
        page = tmp_path / f"{path.stem}.html"
        page.write_text("<!DOCTYPE html><html><body><p id='figure-status'></p>"
                        + "".join(f"<img class='figure' src='data:image/png;base64,{b.strip()}'>" for b in imgs)
                        + f"<script>{_SCRIPT}</script></body></html>", encoding="utf-8")
        dom = subprocess.run([_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                             timeout=120)
        assert imgs and f"figures rendered: {len(imgs)}/{len(imgs)}" in dom.stdout, (path.name, dom.stderr[-1000:])
