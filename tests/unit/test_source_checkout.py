"""Importing pyllm from inside a source checkout (which has no compiled module) names the cause."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_checkout_that_shadows_the_installed_package_is_named(tmp_path):
    # A copy of the checkout's layout without any compiled module: what `python -c "import pyllm"` sees
    # when run from the root of a fresh clone after `pip install .`.
    shutil.copytree(ROOT / "src" / "pyllm", tmp_path / "pyllm", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "vendor").mkdir()
    shutil.copy(ROOT / "vendor" / "fetch.py", tmp_path / "vendor" / "fetch.py")
    # -S: no .pth files, so an editable install's import hook does not hide the shadowing; site-packages
    # (where the installed pyllm's metadata is) comes after the current directory, as usual.
    code = f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r}); import pyllm"
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "imported from the source checkout" in last and str(tmp_path / "pyllm") in last, last
    assert "Run from another directory" in last


def test_the_checkout_root_does_not_shadow_the_installed_package():
    # src layout: from the repository root (sys.path[0] is the current directory), `import pyllm` finds
    # the installed package with its compiled module, as README's snippets and `python -m pyllm.server` need.
    proc = subprocess.run([sys.executable, "-c", "import pyllm, pyllm._ffi; print(pyllm.__file__)"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent != ROOT / "pyllm"
