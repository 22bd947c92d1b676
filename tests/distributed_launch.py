"""Start a tiny gloo process group on 127.0.0.1 from a test and collect one result per rank.

``launch("module:function", world_size=2, **kwargs)`` spawns ``world_size`` processes (spawn start
method, 1 thread each), each of which joins a gloo group over TCP on 127.0.0.1, calls
``function(rank, world_size, **kwargs)`` and saves what it returns (plain tensors / dicts /
strings) with ``torch.save``. The parent waits at most ``timeout`` seconds, kills the workers if
they are still running, and returns the results in rank order (a worker's exception is re-raised
in the parent with its traceback text).
"""
from __future__ import annotations

import importlib
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, target, kwargs, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        module, name = target.split(":")
        fn = getattr(importlib.import_module(module), name)
        result = fn(rank, world_size, **kwargs)
        torch.save({"ok": True, "result": result}, path)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def launch(target: str, world_size: int = 2, timeout: float = 120.0, **kwargs):
    """Run ``target`` (``"module:function"``) on ``world_size`` gloo ranks; return the per-rank results."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), target, kwargs, out_dir),
                                 nprocs=world_size, start_method="spawn", join=False)
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{target}: the {world_size} ranks did not finish within {timeout:.0f} s")
        except mp.ProcessRaisedException as exc:
            failure = exc
        except mp.ProcessExitedException as exc:
            failure = exc
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            path = os.path.join(out_dir, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"{target}: rank {rank} wrote no result ({failure})")
            saved = torch.load(path, weights_only=False)
            if not saved["ok"]:
                raise RuntimeError(f"{target}: rank {rank} failed:\n{saved['error']}")
            results.append(saved["result"])
        if failure is not None:
            raise RuntimeError(f"{target}: {failure}")
        return results
