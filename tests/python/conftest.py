"""Fixtures for driving the real Python SDK (matchlock==0.2.17 from PyPI) against our binary.

Every test session gets its own MATCHLOCK_HOME (sandbox state) and its own image/volume cache,
so the test images tagged here as `alpine:latest` and `python:3.12-alpine` never shadow a user's
real images. The guest kernel, initramfs and accelerator verdict are shared with the normal cache
(symlinked), so nothing is rebuilt or re-probed.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("MATCHLOCK_BIN") or str(REPO / "target" / "debug" / "matchlock")

# Test images: (tag, builder script, builder args).
BUSYBOX = "mltest/busybox:1"
PYTHON = "mltest/python:1"
# ENTRYPOINT ["/bin/echo","entry:"], CMD ["default-cmd"], USER app, WORKDIR /home/app.
ENTRY = "mltest/entry:1"


def ml(*args, check=True, **kw):
    """Runs the matchlock CLI with the session's environment."""
    out = subprocess.run([BIN, *args], capture_output=True, text=True, **kw)
    if check and out.returncode != 0:
        raise AssertionError(f"matchlock {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    return out


@pytest.fixture(scope="session", autouse=True)
def matchlock_env(tmp_path_factory):
    assert os.path.exists(BIN), f"{BIN} is missing; build it with 'cargo build' (scripts/test does)"
    # Sockets live under MATCHLOCK_HOME, whose path must stay short.
    home = tempfile.mkdtemp(prefix="mlpy", dir="/tmp")
    cache = tmp_path_factory.mktemp("cache")
    real = pathlib.Path(os.environ.get("MATCHLOCK_CACHE_DIR") or pathlib.Path.home() / ".cache" / "matchlock")
    for name in ("kernel", "initramfs", "accel.json"):
        if (real / name).exists():
            (cache / name).symlink_to(real / name)
    os.environ.update(MATCHLOCK_HOME=home, MATCHLOCK_CACHE_DIR=str(cache), MATCHLOCK_BIN=BIN)
    work = tmp_path_factory.mktemp("images")
    busybox_tar = work / "busybox.tar"
    entry_tar = work / "entry.tar"
    python_tar = work / "python.tar"
    subprocess.run([str(REPO / "scripts" / "make-busybox-image"), str(busybox_tar)], check=True,
                   capture_output=True)
    subprocess.run([str(REPO / "scripts" / "make-busybox-image"), str(entry_tar), "--with-entrypoint"],
                   check=True, capture_output=True)
    subprocess.run([str(REPO / "scripts" / "make-python-image"), str(python_tar)], check=True,
                   capture_output=True)
    for tag, tar in [(BUSYBOX, busybox_tar), ("alpine:latest", busybox_tar), (ENTRY, entry_tar),
                     (PYTHON, python_tar), ("python:3.12-alpine", python_tar)]:
        with open(tar, "rb") as f:
            ml("image", "import", tag, stdin=f)
    yield
    ml("kill", "--all", check=False)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def client():
    """One sandbox shared by a module's read-mostly tests (booting one costs seconds under TCG)."""
    from matchlock import Client, Sandbox

    c = Client()
    c.start()
    c.launch(Sandbox(PYTHON))
    yield c
    c.close()
    c.remove()
