"""Generated JSON Lines data and process helpers for the training tests (tiny bases: adapterkit.testing)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from adapterkit.core.demo.run import number_words


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any] | str]) -> Path:
    """One JSON object (or a raw string, for broken lines) per line."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def number_rows(count: int = 100, seed: int = 0) -> list[dict[str, str]]:
    """The demo's task in prompt / completion lines: "47 ->" -> " forty-seven"."""
    numbers = list(range(100))
    random.Random(seed).shuffle(numbers)
    return [{"prompt": f"{n} ->", "completion": f" {number_words(n)}"} for n in numbers[:count]]


def sentiment_rows(count: int = 60, seed: int = 0) -> list[dict[str, str]]:
    """A separable 3-class task with string labels: the label is in the words."""
    rng = random.Random(seed)
    words = {"pos": ("good", "great", "fine"), "neg": ("bad", "awful", "poor"), "neu": ("okay", "plain", "so-so")}
    rows = []
    for i in range(count):
        label = ("pos", "neg", "neu")[i % 3]
        rows.append({"text": f"{rng.choice(words[label])} {rng.choice(words[label])} day", "label": label})
    return rows


def one_torch_thread():
    """A pytest fixture body: one torch thread while the module runs (tiny models gain nothing from more, and
    on a busy machine OpenMP's spinning threads make every step many times slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torchrun_command(nproc: int = 2) -> list[str]:
    """torchrun as ``python -m torch.distributed.run`` with this interpreter: its workers run this same Python
    (the ``torchrun`` script of a copied virtual environment may name another interpreter in its shebang)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def quiet_env(**extra: str) -> dict[str, str]:
    """The environment of a training subprocess: offline, one thread, no progress bars."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "PYTHONWARNINGS": "ignore", **extra}


def run_checked(args: list[str], cwd: Path, env: Mapping[str, str] | None = None,
                timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=dict(env or quiet_env()), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): torchrun starts each worker in a session of its own, so
    killing torchrun's process group would leave the workers running."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children = [int(x) for x in handle.read().split()]
        except OSError:
            continue
        for child in children:
            out += [child, *descendants(child)]
    return out


def kill_tree(proc: subprocess.Popen) -> int:
    """SIGKILL ``proc`` and every process below it; wait until none runs. Returns how many were killed."""
    doomed = [proc.pid, *descendants(proc.pid)]
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    deadline = time.monotonic() + 60
    for pid in doomed[1:]:
        while _alive(pid):
            assert time.monotonic() < deadline, f"process {pid} survived SIGKILL"
            time.sleep(0.05)
    return len(doomed)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``path`` exists (the run reached a test hook), failing if ``proc`` ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path} appeared: {output[-3000:]}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
