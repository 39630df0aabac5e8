"""The package as users get it: `python -m build` (sdist, then a wheel built from it)
installed into a fresh virtualenv, and `pip install .` into another. Both must import and
work with nothing else.

Slow (two release builds of the extension); a shared CARGO_TARGET_DIR keeps the second one quick.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SMOKE = r"""
import importlib.resources, xconnector
from xconnector import Engine, sequence_hashes
from xconnector.exceptions import InvalidInputError, XConnectorError
assert sequence_hashes(list(range(1, 65)))[-1] == 0x445502a8048d6688
e = Engine(block_bytes=8, capacity_bytes=64)
assert e.store(list(range(32)), bytes(range(16))) == 2
out = bytearray(16)
assert e.load(list(range(32)), out) == 32 and out == bytes(range(16))
try:
    e.lookup([-1])
except InvalidInputError as exc:
    assert isinstance(exc, XConnectorError)
else:
    raise AssertionError("negative token id accepted")
files = importlib.resources.files("xconnector")
assert files.joinpath("py.typed").is_file() and files.joinpath("_native.pyi").is_file()
assert xconnector.__file__.startswith(SITE), xconnector.__file__
print("ok", xconnector.__version__)
"""


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def fresh_venv(path: Path) -> Path:
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return path / "bin" / "python"


def smoke(python: Path, tmp: Path) -> None:
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    code = f"SITE = {site.stdout.strip()!r}\n{SMOKE}"
    # Run from a directory without the source tree, so the installed package is what imports.
    r = run([str(python), "-c", code], cwd=tmp)
    assert r.stdout.strip() == "ok 1.0.0"
    # The console script is installed and reads a config (and from that, the schema in Rust).
    config = tmp / "xc.yaml"
    config.write_text("Common:\n  xconnector: {enabled: true, adapters: [{name: lmcache}]}\n")
    r = run([str(python.parent / "xconnector"), "check-config", str(config)], cwd=tmp)
    assert r.stdout.startswith(f"{config}: valid; XConnector is enabled"), r.stdout


@pytest.fixture(scope="module")
def build_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    target = ROOT / "target" / "packaging-test"
    return {**os.environ, "CARGO_TARGET_DIR": str(target)}


@pytest.mark.slow
def test_sdist_and_wheel_from_build_install_into_a_fresh_venv(
    tmp_path: Path, build_env: dict[str, str]
) -> None:
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)],
        env=build_env,
    )
    wheels = list(dist.glob("xconnector-1.0.0-*.whl"))
    sdists = list(dist.glob("xconnector-1.0.0.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    python = fresh_venv(tmp_path / "venv")
    run([str(python), "-m", "pip", "install", "--quiet", str(wheels[0])])
    smoke(python, tmp_path)


@pytest.mark.slow
def test_pip_install_from_the_source_tree(tmp_path: Path, build_env: dict[str, str]) -> None:
    python = fresh_venv(tmp_path / "venv")
    run([str(python), "-m", "pip", "install", "--quiet", str(ROOT)], env=build_env)
    smoke(python, tmp_path)
