"""Execute a notebook and save what a learner sees: an HTML page and every figure as PNG.

.venv/bin/python tools/render_notebook.py notebooks/01_mlp.ipynb   # → build/render/01_mlp/
"""

from __future__ import annotations

import base64
import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.preprocessors import ExecutePreprocessor


def render(path: Path, out_root: Path = Path("build/render")) -> Path:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    ExecutePreprocessor(timeout=600, kernel_name="python3").preprocess(nb, {"metadata": {"path": str(path.parent)}})
    seconds = time.perf_counter() - start
    out = out_root / path.stem
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / f"{path.stem}.html").write_text(HTMLExporter().from_notebook_node(nb)[0])
    count = 0
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if "image/png" in data:
                count += 1
                (out / f"cell{index:02d}_{count}.png").write_bytes(base64.b64decode(data["image/png"]))
            elif "text/plain" in data or output.get("output_type") == "stream":
                text = output.get("text", "") or data.get("text/plain", "")
                (out / f"cell{index:02d}.txt").open("a").write(text if isinstance(text, str) else "".join(text))
    print(f"{path}: executed in {seconds:.1f} s, {count} figures → {out}")
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        render(Path(arg))
