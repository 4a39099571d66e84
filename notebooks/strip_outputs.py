"""Saves notebooks without outputs, so their diffs stay reviewable: ``python notebooks/strip_outputs.py``.

    python notebooks/strip_outputs.py                  # strips every notebooks/*.ipynb in place
    python notebooks/strip_outputs.py a.ipynb b.ipynb  # those files
    python notebooks/strip_outputs.py --check          # lists notebooks that hold outputs; exit 1 if any

Stripping empties every code cell's outputs and execution count, drops the cell metadata Jupyter adds when
it runs or folds a cell (``execution``, ``collapsed``, ``scrolled``) and keeps only the kernel's name in the
notebook metadata. The standard library alone: run it before committing (tests/test_notebooks.py checks).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_RUN_METADATA = ("execution", "collapsed", "scrolled")


def strip(nb: dict) -> dict:
    """The notebook (nbformat 4 JSON) without outputs, execution counts or run metadata (a new dict)."""
    nb = json.loads(json.dumps(nb))
    for cell in nb.get("cells", []):
        for key in _RUN_METADATA:
            cell.get("metadata", {}).pop(key, None)
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
    meta = nb.get("metadata", {})
    kept = {"kernelspec": meta["kernelspec"]} if "kernelspec" in meta else {}
    if "language_info" in meta:
        kept["language_info"] = {"name": meta["language_info"].get("name", "python")}
    nb["metadata"] = kept
    return nb


def dumps(nb: dict) -> str:
    """Notebook JSON as Jupyter writes it (sorted keys, one-space indent, a final newline)."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False, separators=(",", ": ")) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any needs stripping")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = json.loads(path.read_text())
        clean = strip(nb)
        if clean != nb:
            dirty.append(path)
            if not args.check:
                path.write_text(dumps(clean))
    for path in dirty:
        print(f"{path}: {'holds outputs' if args.check else 'stripped'}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
