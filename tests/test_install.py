"""A wheel built from the repository works without the checkout: installed into a fresh venv
and run from an empty folder, it finds its built-in configs by name and trains.

The venv sees the development venv's packages (torch, accelerate, ...) through a .pth file
holding that site-packages folder. A plain path line does not run the .pth files inside it, so
the editable install's import hook stays out and `import avpgan` can only find the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from avpgan import config as config_mod
from conftest import ROOT
from datagen import make_tree

pytestmark = pytest.mark.slow


def run(cmd: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv holding only the wheel; the source is copied first so that the build leaves no
    build/ or egg-info behind in the checkout."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    for folder in ("avpgan", "configs"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, src / file)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", tmp / "dist", src], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("avpgan-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    site = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                    cwd=tmp).stdout.strip())
    (site / "dev_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # pip comes from the development venv too; --ignore-installed: the editable avpgan it can see
    # is not this environment's to replace.
    run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
         wheel], cwd=tmp)
    return venv


@pytest.fixture()
def elsewhere(tmp_path) -> Path:
    """An empty working folder: no configs/, no avpgan/ to import by accident."""
    return tmp_path


def test_the_wheel_holds_every_module_and_config(venv, elsewhere):
    out = run([venv / "bin" / "python", "-c", "import avpgan, avpgan.configs; print(avpgan.__file__)"],
              cwd=elsewhere).stdout
    package = Path(out.strip()).parent
    assert package.is_relative_to(venv), f"avpgan imported from {package}, not from the venv"
    modules = {p.relative_to(ROOT / "avpgan") for p in (ROOT / "avpgan").rglob("*.py")}
    assert modules <= {p.relative_to(package) for p in package.rglob("*.py")}, "pyproject.toml misses a subpackage"
    assert (package / "serve.html").is_file(), "the page of avpgan serve is not package data"
    assert sorted(p.name for p in (package / "configs").glob("*.yaml")) == \
        sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def test_installed_command_shows_a_built_in_config_by_name(venv, elsewhere):
    avpgan = venv / "bin" / "avpgan"
    assert run([avpgan, "--version"], cwd=elsewhere).stdout.startswith("avpgan ")
    shown = run([avpgan, "config", "show", "avpgan.yaml"], cwd=elsewhere).stdout
    assert shown.startswith("name: avpgan\n") and "batch_size: 128" in shown
    assert "tiny.yaml" in run([avpgan, "config", "list"], cwd=elsewhere).stdout


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """Shards of datagen's tree (two training identities): seconds to build, enough for a few voice steps."""
    from avpgan.data import shards_build

    tree = make_tree(tmp_path_factory.mktemp("raw"))
    out = tmp_path_factory.mktemp("shards")
    shards_build.build(tree["voxceleb"], tree["vggface"], tree["meta"], out, config_mod.load(ROOT / "configs" / "tiny.yaml").data,
                 samples_per_shard=2, workers=1)
    return out


def test_installed_command_trains_from_a_built_in_config(venv, elsewhere, small_shards):
    run([venv / "bin" / "avpgan", "train", "--config", "tiny.yaml", f"data.shards={small_shards}", "train.run_dir=run",
         "tracking.enabled=false", "train.stages=[voice]", "train.voice.steps=2", "train.voice.batch_size=4",
         "train.checkpoint_every=2", "train.log_every=1", "data.workers=0"], cwd=elsewhere, timeout=180)
    assert (elsewhere / "run" / "voice" / "model.safetensors").is_file()
