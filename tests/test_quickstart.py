"""The README's quickstart, run as written: its fenced blocks are extracted from README.md (so
this test breaks when the README drifts) and run in order against the embedded PostgreSQL a
fresh `make run` starts: the banner must match the README's (with `…` for what varies), its
`try` line must work when pasted into a shell, every command must succeed, every SQL block must
run through `pgnotify-worker psql`, and the worker must print what the README shows."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "pgnotify-worker"
CLI = ".venv/bin/pgnotify-worker"


def blocks(doc: Path, section: str) -> list[tuple[str, str]]:
    """(language, text) of each fenced block of one `## section`, in order."""
    text = doc.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)


def pattern(line: str, port: int) -> re.Pattern[str]:
    """A README line as a regex: `…` is anything, the port and the CLI's path may differ."""
    parts = [re.escape(p) for p in line.split("…")]
    regex = ".*".join(parts)
    regex = regex.replace(re.escape(CLI), f"(?:{re.escape(str(SCRIPT))}|pgnotify-worker)")
    regex = regex.replace("9090", str(port))
    regex = re.sub(r"\\#1\b", r"\\#\\d+", regex)
    return re.compile(regex)


class Output:
    """The worker's stdout, collected by a thread, searched with a timeout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        threading.Thread(
            target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True
        ).start()

    def wait_for(self, wanted: list[re.Pattern[str]], timeout: float = 60) -> list[str]:
        """The first run of consecutive lines matching `wanted`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = [line.rstrip("\n") for line in self.lines]
            for i in range(len(seen) - len(wanted) + 1):
                if all(p.fullmatch(seen[i + k]) for k, p in enumerate(wanted)):
                    return seen[i : i + len(wanted)]
            time.sleep(0.1)
        pytest.fail(
            "the worker never printed:\n"
            + "\n".join(p.pattern for p in wanted)
            + "\n--- it printed:\n"
            + "".join(self.lines)
        )


@pytest.mark.slow
def test_the_readme_quickstart_works_as_written(tmp_path: Path) -> None:
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} is not installed (pip install -e .)")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGNOTIFY_", "PG"))}
    env["PGNOTIFY_HTTP_PORT"] = str(port)
    worker: subprocess.Popen[str] | None = None
    output: Output | None = None

    def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
        )
        assert done.returncode == 0, (argv, done.stdout, done.stderr)
        assert done.stderr == "", (argv, done.stderr)  # quiet unless something is wrong
        return done

    def psql(sql: str) -> str:
        return run(
            [str(SCRIPT), "psql", "-X", "-v", "ON_ERROR_STOP=1", "-f", "-"], stdin=sql
        ).stdout

    try:
        for language, text in blocks(ROOT / "README.md", "Quickstart"):
            if language == "sh":
                for line in text.splitlines():
                    argv = shlex.split(line, comments=True)
                    if argv == ["make", "run"]:  # = PGNOTIFY_LOG_FORMAT=text pgnotify-worker run
                        worker = subprocess.Popen(
                            [str(SCRIPT), "run"], cwd=tmp_path, env={**env, "PGNOTIFY_LOG_FORMAT": "text"},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                        )  # fmt: skip
                        output = Output(worker)
                    elif argv == ["make", "status"]:
                        assert "channel" in run([str(SCRIPT), "status"]).stdout
                    elif argv[:2] == [CLI, "tail"]:  # runs until Ctrl-C
                        tail = subprocess.Popen(
                            [str(SCRIPT), *argv[1:]],
                            cwd=tmp_path,
                            env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            text=True,
                        )
                        time.sleep(3)
                        tail.send_signal(signal.SIGINT)
                        out, err = tail.communicate(timeout=30)
                        assert tail.returncode == 130, err
                        assert re.search(r"#\d+\s+email\s+sent\b", out), out
                    elif argv[:1] == [CLI]:
                        run([str(SCRIPT), *argv[1:]])
                    else:
                        pytest.fail(
                            f"the quickstart test does not know how to run {line!r}: add it"
                        )
            elif language == "sql":
                for _ in range(100):  # a SELECT waits for the worker to write what it shows
                    shown = psql(text)
                    if "SELECT" not in text.split(None, 1)[0].upper() or "(0 rows)" not in shown:
                        break
                    time.sleep(0.1)
                assert "(0 rows)" not in shown, shown
            elif language == "text":
                assert output is not None, "an output block before `make run`"
                expected = [pattern(line, port) for line in text.splitlines()]
                got = output.wait_for(expected)
                if text.startswith("pgnotify-worker "):  # the banner: paste its try line
                    tried = next(line for line in got if line.startswith("  try "))
                    done = subprocess.run(
                        ["sh", "-c", tried.split(None, 1)[1]],
                        capture_output=True,
                        text=True,
                        cwd=tmp_path,
                        env=env,
                        timeout=120,
                    )
                    assert done.returncode == 0 and done.stdout.strip().isdigit(), done.stderr
            else:
                pytest.fail(f"a ```{language} block in the quickstart: say how to test it")
        assert worker is not None
        inbox = psql("SELECT user_id, title, body FROM pgnotify.inbox;")
        assert "ada" in inbox and "Your account is ready" in inbox
        for language, text in blocks(
            ROOT / "docs" / "quickstart.md", "Try it (nothing but Python)"
        ):
            if language == "sql":
                psql(text)
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.kill()
