"""The house rule of src/msr: layers import only downward, peers not at all, and no module
cycle - read from the code with ``ast`` (tools/import_graph.py), lazy imports included. And
docs/architecture.md draws the graph the code has."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools/import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = module
    spec.loader.exec_module(module)
    return module


ig = _load_tool()


def test_src_msr_keeps_the_layer_rule():
    assert ig.violations(ig.graph()) == []


def test_every_unit_of_the_package_has_a_floor():
    units = {ig.unit(m) for m in ig.modules()}
    assert units == set(ig.FLOOR)


def _house(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for rel, text in {"msr/__init__.py": "", **files}.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return src


def test_the_rule_names_upward_peer_cyclic_and_unplaced_imports(tmp_path):
    src = _house(tmp_path, {
        "msr/catalog.py": "def f():\n    from msr.cli import main  # lazy, still upward\n",
        "msr/cli/__init__.py": "",
        "msr/analysis/__init__.py": "",
        "msr/analysis/a.py": "import msr.pipeline.grid\n",
        "msr/pipeline/__init__.py": "",
        "msr/pipeline/grid.py": "from msr import catalog\n",
        "msr/core/__init__.py": "",
        "msr/core/x.py": "from . import y\n",  # relative imports resolve too
        "msr/core/y.py": "from msr.core.x import thing\n",
        "msr/shed.py": "",
    })
    problems = ig.violations(ig.graph(src))
    assert "shed: not on any floor of LAYERS (tools/import_graph.py): place it" in problems
    assert "msr.catalog imports msr.cli: upward (catalog is on floor 0, cli on 6)" in problems
    assert "msr.analysis.a imports msr.pipeline.grid: analysis and pipeline are peers on floor 4" in problems
    assert "import cycle: msr.core.x -> msr.core.y" in problems
    assert len(problems) == 4, problems


def test_a_downward_house_passes(tmp_path):
    src = _house(tmp_path, {
        "msr/catalog.py": "",
        "msr/core/__init__.py": "from msr import catalog\n",
        "msr/training/__init__.py": "def f():\n    from msr.core import thing\n    import msr.catalog\n",
    })
    assert ig.violations(ig.graph(src)) == []


def test_docs_architecture_draws_the_codes_graph():
    """docs/architecture.md's generated part (floors and arrows) is the code's: an import added
    between two units, or a unit moved, must be redrawn
    (`python tools/import_graph.py --markdown`, pasted over the generated part). Line counts
    are a snapshot and not compared."""
    doc = (REPO / "docs/architecture.md").read_text()
    start, end = (doc.index(marker) for marker in ig.GENERATED)
    drawn = doc[start:end]
    arrows = set(re.findall(r"^\s+(\w+) -->\|\d+\| (\w+)$", drawn, re.M))
    assert arrows == set(ig.unit_edges(ig.graph())), "redraw: python tools/import_graph.py --markdown"
    rows = re.findall(r"^\| (\d+) \| `(\w+)(?:/|\.py)` \|", drawn, re.M)
    assert {u: int(f) for f, u in rows} == {u: f for u, f in ig.FLOOR.items() if u not in ("msr", "__main__")}
