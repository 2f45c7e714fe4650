"""Every module imports on its own (a name used but never imported, or an import that works only after
another of this package's modules, shows here), and the code is ruff-clean (lint and format, configured in
pyproject.toml)."""

import shutil
import subprocess

import pytest

from helpers import ROOT, run_python

MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in (ROOT / "simpo_lightning").rglob("*.py")
)

# Run in a fresh interpreter: pytest (and under xdist every test module) has imported the package already,
# where import_module would only look each module up. Between two modules the package is dropped from
# sys.modules, so each one is imported first, on its own; third-party modules stay loaded (re-importing
# torch for each of them would take minutes), they cannot hide a fault of ours that ruff's F821 misses.
EACH_ON_ITS_OWN = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "simpo_lightning" or m.startswith("simpo_lightning.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ": " + traceback.format_exc(limit=-2))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own(tmp_path):
    result = run_python(EACH_ON_ITS_OWN, tmp_path, *MODULES)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert len(MODULES) > 30  # the walk found the package


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    ruff = shutil.which("ruff")
    assert ruff, "ruff is a test dependency: pip install -e '.[test]'"
    result = subprocess.run([ruff, *command], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
