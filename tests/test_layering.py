"""tools/check_layers.py: floors, sibling units, lazy / TYPE_CHECKING imports, cycles, unplaced modules.

Synthetic trees are built in tmp_path; the last test runs the checker on this repository.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "check_layers.py"

_spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
check_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_layers)

# A small tree that respects the floors: every import points down (or into its own unit).
CLEAN = {
    "megatron_sr/__init__.py": '"""root"""\n__version__ = "0"\n',
    "megatron_sr/parallel/__init__.py": "from . import layers\n",
    "megatron_sr/parallel/layers.py": "import torch\n\nX = 1\n",
    "megatron_sr/config.py": "from megatron_sr.parallel.layers import X\n",
    "megatron_sr/model/__init__.py": "from .gpt import Model\n",
    "megatron_sr/model/gpt.py": "from .. import config\nfrom ..parallel import layers\n\nclass Model: ...\n",
    "megatron_sr/optimizer/__init__.py": "",
    "megatron_sr/optimizer/sr.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n"
                                   "    from ..config import X\n",
    "megatron_sr/training/__init__.py": "",
    "megatron_sr/training/loop.py": "from ..model import Model\n\n\ndef run():\n"
                                    "    from megatron_sr.optimizer import sr\n    return sr\n",
    "tools/x.py": "import sys\n\nfrom megatron_sr import __version__\nfrom megatron_sr.training.loop import run\n",
    "pretrain_gpt.py": "import megatron_sr.training.loop\n",
}


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run_check(root: Path, capsys) -> tuple[int, list[str]]:
    rc = check_layers.main(["--repo", str(root)])
    return rc, capsys.readouterr().out.splitlines()


def test_clean_tree_passes(tmp_path, capsys):
    rc, out = run_check(make_tree(tmp_path, CLEAN), capsys)
    assert rc == 0, "\n".join(out)
    assert out == ["layers ok: 12 modules, 11 imports, 0 violations"]


def test_cli_exit_codes(tmp_path):
    root = make_tree(tmp_path, CLEAN)
    ok = subprocess.run([sys.executable, str(SCRIPT), "--repo", str(root)], capture_output=True, text=True)
    assert ok.returncode == 0 and "0 violations" in ok.stdout
    (root / "megatron_sr/config.py").write_text("from .training import loop\n")
    bad = subprocess.run([sys.executable, str(SCRIPT), "--repo", str(root)], capture_output=True, text=True)
    assert bad.returncode == 1 and "megatron_sr/config.py:1:" in bad.stdout


def test_upward_import_fails_naming_file_and_line(tmp_path, capsys):
    root = make_tree(tmp_path, CLEAN | {"megatron_sr/parallel/a.py": "import os\nfrom ..training import loop\n"})
    rc, out = run_check(root, capsys)
    assert rc == 1
    assert ("megatron_sr/parallel/a.py:2: megatron_sr.parallel.a imports megatron_sr.training.loop: "
            "imports upward: floor 1 primitives -> floor 7 training") in out
    assert out[-1] == "layers FAILED: 13 modules, 12 imports, 1 violations"


def test_lazy_and_type_checking_upward_imports_fail(tmp_path, capsys):
    lazy = "def f():\n    from megatron_sr.distributed import ddp\n    return ddp\n"
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import megatron_sr.model.gpt\n"
    root = make_tree(tmp_path, CLEAN | {"megatron_sr/distributed/__init__.py": "",
                                        "megatron_sr/distributed/ddp.py": "X = 1\n",
                                        "megatron_sr/data/__init__.py": typed,
                                        "megatron_sr/parallel/layers.py": lazy})
    rc, out = run_check(root, capsys)
    assert rc == 1
    assert any(line.startswith("megatron_sr/parallel/layers.py:2: megatron_sr.parallel.layers imports "
                               "megatron_sr.distributed.ddp: imports upward: floor 1") for line in out), out
    assert any(line.startswith("megatron_sr/data/__init__.py:3: megatron_sr.data imports megatron_sr.model.gpt: "
                               "imports upward: floor 3 data -> floor 4 model/pipeline/optimizer") for line in out), out
    assert out[-1].endswith(" 2 violations"), out


def test_sibling_on_same_floor_fails(tmp_path, capsys):
    root = make_tree(tmp_path, CLEAN | {"megatron_sr/model/gpt.py": "from megatron_sr.optimizer.sr import step\n"})
    rc, out = run_check(root, capsys)
    assert rc == 1
    assert any(line.startswith("megatron_sr/model/gpt.py:1: megatron_sr.model.gpt imports megatron_sr.optimizer.sr: "
                               "imports a sibling on the same floor") for line in out), out


def test_cycle_inside_one_package_names_both_modules(tmp_path, capsys):
    root = make_tree(tmp_path, CLEAN | {"megatron_sr/optimizer/dispatch.py": "from . import fused\n",
                                        "megatron_sr/optimizer/fused.py": "\nfrom .dispatch import pick\n"})
    rc, out = run_check(root, capsys)
    assert rc == 1
    cycle = [line for line in out if "import cycle" in line]
    d, f = "megatron_sr.optimizer.dispatch", "megatron_sr.optimizer.fused"
    assert cycle == [f"megatron_sr/optimizer/dispatch.py:1: {d} imports {f}: import cycle among {d}, {f}",
                     f"megatron_sr/optimizer/fused.py:2: {f} imports {d}: import cycle among {d}, {f}"]
    assert out[-1].endswith(" 2 violations")  # no layering complaint: both live in the optimizer unit


def test_self_import_is_a_cycle(tmp_path, capsys):
    rc, out = run_check(make_tree(tmp_path, CLEAN | {"megatron_sr/config.py": "from megatron_sr.config import X\n"}),
                        capsys)
    assert rc == 1
    assert "megatron_sr/config.py:1: megatron_sr.config imports megatron_sr.config: " \
           "import cycle among megatron_sr.config" in out


def test_module_outside_the_table_fails(tmp_path, capsys):
    root = make_tree(tmp_path, CLEAN | {"megatron_sr/extras/__init__.py": "",
                                        "megatron_sr/training/loop.py": "from ..extras import thing\n"})
    rc, out = run_check(root, capsys)
    assert rc == 1
    assert "megatron_sr/extras/__init__.py:1: megatron_sr.extras: not on any floor (add its package to FLOORS)" in out
    assert any(line.startswith("megatron_sr/training/loop.py:1: megatron_sr.training.loop imports megatron_sr.extras: "
                               "target is not on any floor") for line in out), out


def test_root_package_may_import_nothing(tmp_path, capsys):
    rc, out = run_check(make_tree(tmp_path, CLEAN | {"megatron_sr/__init__.py": "from .config import X\n"}), capsys)
    assert rc == 1
    assert any(line.startswith("megatron_sr/__init__.py:1: megatron_sr imports megatron_sr.config: ") for line in out)


def test_from_package_import_name_resolves_submodules(tmp_path):
    root = make_tree(tmp_path, CLEAN | {"megatron_sr/parallel/__init__.py":
                                        "from . import layers, helper\nfrom .layers import X\nfrom .. import config\n"})
    targets = [t for _, t, _ in check_layers.imports_of(root, "megatron_sr.parallel",
                                                        root / "megatron_sr/parallel/__init__.py")]
    # layers is a file -> submodule; helper is only a name -> the package itself; config is a module one level up
    assert sorted(targets) == sorted(["megatron_sr.parallel.layers", "megatron_sr.parallel",
                                      "megatron_sr.parallel.layers", "megatron_sr.config"])
    pkg = make_tree(tmp_path, {"megatron_sr/model/sub/__init__.py": "",
                               "megatron_sr/model/a.py": "from . import sub\n"})
    assert check_layers.imports_of(pkg, "megatron_sr.model.a", pkg / "megatron_sr/model/a.py") == [
        ("megatron_sr.model.a", "megatron_sr.model.sub", 1)]


def test_list_prints_each_module_with_its_floor(tmp_path, capsys):
    assert check_layers.main(["--repo", str(make_tree(tmp_path, CLEAN)), "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "megatron_sr.parallel.layers: floor 1 primitives" in out
    assert "megatron_sr.optimizer.sr: floor 4 model/pipeline/optimizer" in out
    assert "tools.x: floor 8 tools" in out and "pretrain_gpt: floor 8 tools" in out
    assert "megatron_sr: package root" in out


def test_repository_layers_are_clean():
    violations, n_modules, _ = check_layers.check(REPO)
    assert n_modules > 0
    assert violations == [], "import-layering violations:\n" + "\n".join(violations)
