"""The container image, without a Docker engine: the Dockerfile is read for what it promises, and
its command line runs outside a container from the built wheel, with the image's environment."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from pgnotify_worker import __version__
from tests.support.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[1]


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (instruction, arguments), continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    result: list[list[tuple[str, str]]] = [[]]
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            result.append([])
        result[-1].append((instruction.upper(), rest.strip()))
    return result


def runtime() -> list[tuple[str, str]]:
    return stages()[-1]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in runtime():
        if instruction == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def image_command() -> list[str]:
    found = dict(runtime())
    return list(json.loads(found["ENTRYPOINT"])) + list(json.loads(found["CMD"]))


def test_the_dockerfile_keeps_its_promises() -> None:
    final = dict(runtime())
    assert final["FROM"].startswith("python:3.11.") and "slim" in final["FROM"]  # pinned, slim
    assert ":latest" not in final["FROM"]
    assert final["USER"] == "10001:10001"  # non-root, fixed uid (matches the Kubernetes manifests)
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert final["EXPOSE"] == image_env()["PGNOTIFY_HTTP_PORT"] == "9090"
    assert image_command() == ["pgnotify-worker", "run"]
    assert image_env()["PYTHONUNBUFFERED"] == "1"
    build_tools = ("gcc", "build-essential", "apt-get install")
    assert not any(tool in rest for _, rest in runtime() for tool in build_tools)
    version = next(rest for instruction, rest in stages()[0] if instruction == "ARG")
    assert version == f"VERSION={__version__}"  # the pinned install matches the package


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and line[0] != "#"
    ]
    assert lines[0] == "*"
    copied = {
        rest.split()[0]
        for stage in stages()
        for ins, rest in stage
        if ins == "COPY" and "--from" not in rest
    }
    assert {f"!{name.rstrip('/')}" for name in copied} <= {line.rstrip("/") for line in lines}


@pytest.mark.slow
async def test_the_image_command_line_serves_readyz_from_the_installed_wheel(
    dsn: str, tmp_path: Path
) -> None:
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("pgnotify_worker-*.whl")
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--quiet",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    assert (target / "pgnotify_worker" / "schema" / "0001_core.sql").exists()  # schema in the wheel
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PGNOTIFY_")},
        **image_env(),
        "PYTHONPATH": str(target),  # the installed wheel, not the source tree
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_HTTP_PORT": str(port),
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
    }
    program, *args = image_command()
    proc = await asyncio.create_subprocess_exec(
        str(target / "bin" / program), *args, env=env, cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(60):
            while True:
                try:
                    answer = await http.get(f"http://127.0.0.1:{port}/readyz")
                    if answer.status == 200:
                        break
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                await asyncio.sleep(0.1)
            status = await (await http.get(f"http://127.0.0.1:{port}/status")).json()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
        stderr = (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    finally:
        if proc.returncode is None:
            proc.kill()
    assert status["version"] == __version__
    first = json.loads(stderr.splitlines()[0])  # the image logs JSON lines
    assert {"ts", "level", "message", "worker_id"} <= set(first)
    where = subprocess.run(
        [sys.executable, "-c", "import pgnotify_worker; print(pgnotify_worker.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert where.stdout.startswith(str(target))  # what ran was the wheel, not the source tree


LOCK = ROOT / "requirements" / "image.lock"
IMAGE_EXTRAS = ("tracing", "otlp")


def locked() -> dict[str, tuple[str, list[str]]]:
    """requirements/image.lock as {normalized name: (version, hashes)}."""
    from packaging.utils import canonicalize_name

    found: dict[str, tuple[str, list[str]]] = {}
    text = LOCK.read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split()
        name, _, version = spec.partition("==")
        assert version, f"not pinned with ==: {line}"
        hashes = [opt.removeprefix("--hash=") for opt in options if opt.startswith("--hash=")]
        found[canonicalize_name(name)] = (version, hashes)
    return found


def test_the_image_lock_satisfies_pyproject() -> None:
    """Every runtime dependency (and those of the extras the image installs) is in the lock, at
    a version its specifier allows, with hashes: `make lock` after changing pyproject.toml."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        wanted += project["optional-dependencies"][extra]
    lock = locked()
    stale = []
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in lock:
            stale.append(f"{name}: missing")
        elif not requirement.specifier.contains(lock[name][0], prereleases=True):
            stale.append(f"{name}=={lock[name][0]} does not satisfy {requirement.specifier}")
    assert not stale, f"requirements/image.lock is stale (run `make lock`): {stale}"
    assert all(hashes for _, hashes in lock.values())  # --require-hashes needs every one
    assert "opentelemetry-sdk" in lock and "opentelemetry-exporter-otlp-proto-http" in lock
    assert not {"pip", "setuptools", "wheel"} & set(lock)


def test_the_image_installs_the_lock_with_hashes_and_keeps_no_installers() -> None:
    build, final = stages()[1], runtime()
    runs = " ".join(rest for ins, rest in build if ins == "RUN")
    assert "--require-hashes" in runs and "-r requirements/image.lock" in runs
    assert "--no-deps" in runs.split("pgnotify_worker-")[0].rsplit("install", 1)[1]  # the wheel
    assert "venv --without-pip /opt/venv" in runs
    assert ("COPY", "--from=build /opt/venv /opt/venv") in final
    cleanup = " ".join(rest for ins, rest in final if ins == "RUN")
    assert "pip uninstall --yes" in cleanup and all(
        tool in cleanup for tool in ("pip", "setuptools", "wheel", "ensurepip")
    )
    assert image_env()["PATH"].startswith("/opt/venv/bin:")
    assert any(ins == "COPY" and rest.startswith("LICENSE ") for ins, rest in final)
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert {".venv/", ".venv-min/", ".pgnotify/", ".git/"} <= set(ignored)
