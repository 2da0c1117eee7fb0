"""What `pip install .` (not editable) installs: the library phi4flash.py and nothing that cannot work
there. chat.py and convert.py run from a clone, so no console scripts are declared."""
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT


def test_no_console_scripts_are_declared():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert not re.search(r"^\[project\.(scripts|gui-scripts|entry-points)", text, re.M)
    assert re.search(r'^py-modules = \["phi4flash"\]$', text, re.M)


def test_a_plain_install_is_the_library_alone(tmp_path, converted):
    """Build the wheel pip would install (from a copy of the sources, without network), install it into
    a folder and import it from elsewhere. Its trace command takes a converted folder; a snapshot needs
    convert.py, which only a clone has, and the line says how."""
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools is not installed in this environment, so no wheel can be built offline")
    if tuple(map(int, setuptools.__version__.split(".")[:2])) < (70, 1):
        pytest.importorskip("wheel", reason=f"setuptools {setuptools.__version__} needs the wheel package to build a wheel")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "phi4flash.py"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = os.listdir(tmp_path / "dist")
    names = zipfile.ZipFile(tmp_path / "dist" / wheel).namelist()
    assert [n for n in names if ".dist-info/" not in n] == ["phi4flash.py"]
    assert not any(n.endswith("entry_points.txt") for n in names)
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                        str(tmp_path / "dist" / wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(tmp_path / "site" / "bin")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "PHI4FLASH_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", "import phi4flash; print(phi4flash.__file__)"], capture_output=True,
                       text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "site" / "phi4flash.py"), r.stderr

    def trace(model):
        return subprocess.run([sys.executable, "-m", "phi4flash", "trace", str(model), "--ids", "5,68,417"],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)

    for model in (converted, os.path.join(converted, "model.safetensors")):  # a converted folder needs no converter
        r = trace(model)
        assert r.returncode == 0 and "trace of 3 tokens" in r.stdout and r.stderr == "", r.stderr
    r = trace(os.path.join(ROOT, "tests", "fixtures", "tiny-phi4flash"))  # a snapshot does: the line says how
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "a Hugging Face snapshot needs convert.py to be converted first" in r.stderr
    assert "in a clone of phi4flash run: python convert.py " in r.stderr and not os.path.exists(tmp_path / "cache")
