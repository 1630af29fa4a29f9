"""tools/install.sh (what tests/run.sh and examples/quickstart.sh install through) keeps the
environment's torch: simulated as NVIDIA's container is, with another torch build installed
and pinned by PIP_CONSTRAINT. Here that torch is a stand-in wheel (a pre-release version, as NGC's are,
installed into a virtual environment that sees this machine's packages); pip must leave it,
install the package around it, and the script must say which torch it kept."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a virtual environment and a pip resolve (about 20 s)

REPO = Path(__file__).resolve().parents[1]
FAKE_VERSION = "2.10.0a0+nv25.11"  # the form of NGC 25.11's torch version: a pre-release


def _fake_torch_wheel(out: Path, version: str = FAKE_VERSION) -> Path:
    """A wheel named torch whose module only reports its version (a CUDA 12.8 build)."""
    info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f'__version__ = "{version}"\nclass version:\n    cuda = "12.8"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    rows = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        rows.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(rows + [f"{info}/RECORD,,"]) + "\n"
    wheel = out / f"torch-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def test_install_keeps_a_constrained_torch(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    subprocess.run([*pip, str(_fake_torch_wheel(tmp_path))], check=True)
    constraint = tmp_path / "constraints.txt"
    constraint.write_text(f"torch=={FAKE_VERSION}\n")  # as NGC's /etc/pip/constraint.txt does
    env = {**os.environ, "PYTHON": str(python), "PIP_CONSTRAINT": str(constraint)}
    done = subprocess.run(["bash", "tools/install.sh", "test"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    try:
        assert done.returncode == 0, out
        assert re.search(rf"keeping the installed torch {re.escape(FAKE_VERSION)} \(CUDA 12\.8\) "
                         rf"from {re.escape(str(venv))}", out), out
        assert "installing the CPU build" not in out
        check = subprocess.run(
            [str(python), "-c", "import torch, megatron_mile, importlib.metadata as m; "
             "print(torch.__version__, m.version('torch'), megatron_mile.__file__)"],
            capture_output=True, text=True, check=True)
        assert check.stdout.split() == [FAKE_VERSION, FAKE_VERSION,
                                        str(REPO / "megatron_mile" / "__init__.py")]
    finally:
        # The venv's editable install rewrote the checkout's egg-info: rewrite it for the
        # machine's own environment.
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--no-build-isolation", "-e", str(REPO)], capture_output=True)


def test_install_refuses_a_torch_too_old_instead_of_replacing_it(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    str(_fake_torch_wheel(tmp_path, "2.5.1+cu121"))], check=True)
    done = subprocess.run(["bash", "tools/install.sh"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(python)}, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip() == (
        "install.sh: the installed torch 2.5.1+cu121 is older than 2.6, which megatron-core "
        "0.16.1 needs; install torch >= 2.6 for your CUDA (or use NVIDIA's container, docker/)")
    kept = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"],
                          capture_output=True, text=True, check=True)
    assert kept.stdout.strip() == "2.5.1+cu121"


def test_the_scripts_install_through_it():
    """No other place installs torch: the two scripts delegate to tools/install.sh."""
    for script in ("tests/run.sh", "examples/quickstart.sh"):
        text = (REPO / script).read_text()
        assert "tools/install.sh" in text, script
        assert not re.search(r"pip install[^\n]*torch", text), script
