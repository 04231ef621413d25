"""notebooks/colab.ipynb: every cell but the install runs on a CPU with the tiny model, so its commands can't rot."""
import os

import nbformat
from nbclient import NotebookClient

from conftest import REPO


def test_colab_notebook_runs_on_a_cpu_with_the_tiny_model(tiny_llama, tmp_path, monkeypatch):
    notebook = nbformat.read(REPO / "notebooks" / "colab.ipynb", as_version=4)
    parameters = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    values = dict(REPO_DIR=str(REPO), MODEL=str(tiny_llama), SUBSET=20, MAX_STEPS=2, EVAL_LIMIT=2, MAX_NEW_TOKENS=4,
                  EXPORT="merged", INSTALL=False, DEMO=False, RUN=str(tmp_path / "run"))
    notebook.cells.insert(parameters + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items())))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the kernel and the scripts it starts inherit it
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = ["".join(o.get("text", "") or str(o.get("data", {}).get("text/markdown", "")) for o in cell.get("outputs", []))
               for cell in notebook.cells if cell.cell_type == "code"]
    text = "\n".join(outputs)
    assert "done: " in text and "report: " in text  # trained, then compared
    assert "| metric | base | tuned |" in text  # the report's first table is shown
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "export" / "merged" / "config.json").is_file()
    assert str(tmp_path / "run" / "export" / "merged") in text and "not on Colab" in text
    assert os.getcwd() != str(tmp_path)  # the notebook changed its kernel's directory, not the test's
