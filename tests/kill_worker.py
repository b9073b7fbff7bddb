"""Fork server for the SIGKILL test (test_kill.py): imports vqkit, torch and Lightning once, then
runs each `vqkit fit` it is sent through ``vqkit.cli.main`` in a forked child process, which
the test kills with a real SIGKILL. Forking skips the 3-5 s of imports a fresh `vqkit` process
pays, so 20+ kills fit in the test suite; the child runs the same code the console script does.

Protocol, one JSON object per line on stdin: ``{"argv": [...], "log": path, "write_delay": s}``.
The server answers ``pid <n>`` once the child runs, then ``exit <code>`` (``-9`` when killed by
SIGKILL) when it ends. With ``write_delay`` every ``torch.save`` to a file object (what vqkit's
atomic checkpoint writer does) writes its bytes in ten slices ``write_delay / 10`` seconds apart,
so that kills land inside checkpoint writes.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import lightning.pytorch.cli  # noqa: F401  (imported once here, not in every child)
import torch

import vqkit.data.datamodule  # noqa: F401
import vqkit.training  # noqa: F401
from vqkit.cli import main


def slow_saves(delay: float) -> None:
    save = torch.save

    def slow_save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if isinstance(f, (str, os.PathLike)):
            return save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        step = max(1, len(data) // 10 + 1)
        for i in range(0, len(data), step):
            f.write(data[i : i + step])
            f.flush()
            time.sleep(delay / 10)
        return None

    torch.save = slow_save


def child(job: dict) -> int:
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdin.close()
    if job.get("write_delay"):
        slow_saves(float(job["write_delay"]))
    try:
        code = main(job["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    return int(code or 0)


def serve() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(child(job))
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    serve()
