"""The image's installed size, measured without a container: what the Dockerfile's build stage puts
into /opt/venv (requirements/image.lock with --require-hashes, then the project's wheel with
--no-deps), in a fresh venv here, before and after pip/setuptools/wheel are removed. Not a test:
it downloads from PyPI. The base image (python:3.11 slim) adds its own size, less the
pip/setuptools/wheel/ensurepip that the runtime stage deletes (neither measured here: no Docker).

    python -m bench.image_size          # or: make image-size
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "image.lock"
BUILD_TOOLS = ("pip", "setuptools", "wheel")


def du(path: Path) -> int:
    """Bytes on disk under path (as `du -s`: allocated blocks, links not followed)."""
    total = os.lstat(path).st_blocks * 512
    for dirpath, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def run(*args: str) -> None:
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # PyPI only, as in the image's build
    subprocess.run(args, check=True, env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pgnotify-image-") as tmp:
        work = Path(tmp)
        run(
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(work / "dist"),
            str(ROOT),
        )
        (wheel,) = (work / "dist").glob("pgnotify_worker-*.whl")
        venv = work / "venv"
        run(sys.executable, "-m", "venv", str(venv))  # with pip and setuptools, as venv does
        pip = (str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-cache-dir")
        run(*pip, "--no-deps", "--require-hashes", "--only-binary=:all:", "-r", str(LOCK))
        run(*pip, "--no-deps", str(wheel))
        before = du(venv)
        site = next((venv / "lib").glob("python3.*/site-packages"))
        tools = sum(du(p) for name in BUILD_TOOLS for p in site.glob(f"{name}*") if p.is_dir())
        run(str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y", *BUILD_TOOLS)
        after = du(venv)
        biggest = sorted(((du(p), p.name) for p in site.iterdir() if p.is_dir()), reverse=True)[:8]
        packages = sum(1 for line in LOCK.read_text().splitlines() if "==" in line)
        print(f"lock: {packages} pinned packages; wheel: {wheel.name}")
        print(f"venv with pip/setuptools:    {mib(before)}")
        print(f"pip/setuptools/wheel:        {mib(tools)}")
        print(f"venv as in the image:        {mib(after)}")
        print("largest:", ", ".join(f"{name} {mib(size)}" for size, name in biggest))
        shutil.rmtree(venv)


if __name__ == "__main__":
    main()
