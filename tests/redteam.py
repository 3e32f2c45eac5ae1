"""The red team's harness: a command run as a user runs it, and what a refusal must look like.

``refused(...)`` runs ``python -m hpc_btunet.submit ARGS`` in a fresh process and asserts what
every refusal promises: exit status 2, exactly one ``error:`` line holding the given words, no
traceback, and (with ``root``) nothing written, removed or changed below ``root``. ``peak_rss``
measures a call's peak memory in a child process, for the decompression-bomb cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path below ``root`` with its size, modification time and mode (links not
    followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def cli(args, cwd=None, env=None, timeout: float = 100) -> subprocess.CompletedProcess:
    """``python -m hpc_btunet.submit ARGS`` with wandb disabled unless ``env`` says otherwise."""
    return subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", *map(str, args)],
        cwd=cwd,
        env=dict(os.environ, WANDB_MODE="disabled") | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_refused(done: subprocess.CompletedProcess, words) -> str:
    """Exit 2, one ``error:`` line, no traceback, every word in stderr; returns stderr."""
    err = done.stderr
    assert done.returncode == 2, (done.returncode, done.stdout, err)
    assert "Traceback" not in err, err
    assert sum("error:" in line for line in err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    return err


def refused(args, words, root: Path | None = None, cwd=None, env=None, timeout: float = 100) -> str:
    """Run the command and assert it is refused as promised; with ``root``, that the tree
    below it is unchanged."""
    before = snapshot(root) if root is not None else None
    err = assert_refused(cli(args, cwd=cwd, env=env, timeout=timeout), words)
    if root is not None:
        assert snapshot(root) == before, "a refused command wrote or removed something"
    return err


_PEAK = """
import resource, sys, runpy
sys.argv = ["hpc_btunet.submit", *sys.argv[1:]]
code = 0
try:
    runpy.run_module("hpc_btunet.submit", run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
print("peak-rss-kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def cli_peak(
    args, cwd=None, env=None, timeout: float = 100
) -> tuple[subprocess.CompletedProcess, int]:
    """The command in a child process and that process's peak resident memory in bytes
    (``getrusage``; the command's own process, without any it starts)."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, *map(str, args)],
        cwd=cwd,
        env=dict(os.environ, WANDB_MODE="disabled") | (env or {}),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("peak-rss-kb ")]
    assert lines, done.stderr
    done.stderr = "\n".join(
        ln for ln in done.stderr.splitlines() if not ln.startswith("peak-rss-kb ")
    )
    return done, int(lines[-1].split()[1]) * 1024
