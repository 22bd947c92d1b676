"""``fastsafe bench decode|losses|generation [ARGS...]``: run a benchmark script of the source checkout.

The benchmarks live in the top-level ``benchmarks/`` folder of the source checkout (next to the
``fastsafe`` package folder); they are not installed. This command imports
``benchmarks.<name>`` from there and calls its ``main(argv)`` with the remaining arguments.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCHMARKS = ("decode", "losses", "generation")


def add_parser(sub):
    p = sub.add_parser("bench", help="run a benchmark of the source checkout (decode, losses, generation)",
                       description="Run benchmarks/<name>.py of the source checkout; arguments after the "
                                   "name go to the benchmark (e.g. `fastsafe bench decode --quick`, "
                                   "`fastsafe bench decode -- --help`).")
    p.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    p.set_defaults(func=run)


def checkout_root() -> Path:
    """The folder that holds the ``fastsafe`` package folder (the source checkout for ``pip install -e``)."""
    import fastsafe
    return Path(fastsafe.__file__).resolve().parent.parent


def load_benchmark(name: str, root: Path | None = None):
    """Import ``benchmarks.<name>`` from ``root/benchmarks`` (default: :func:`checkout_root`).

    Raises FileNotFoundError when the checkout has no such benchmark (e.g. a wheel install).
    """
    if name not in BENCHMARKS:
        raise ValueError(f"name: expected one of {BENCHMARKS}, got {name!r}")
    root = Path(root) if root is not None else checkout_root()
    folder = root / "benchmarks"
    script = folder / f"{name}.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"benchmark {name!r} not found: expected {script}. The benchmarks are not installed with the "
            f"package; run `fastsafe bench` from an editable install of the source checkout "
            f"(`pip install --no-build-isolation -e .`), or `python -m benchmarks.{name}` in the checkout.")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve().parent != folder.resolve():
        raise RuntimeError(f"another module named 'benchmarks' is already imported ({loaded!r}); "
                           f"run `python -m benchmarks.{name}` in {root} instead")
    module = importlib.import_module(f"benchmarks.{name}")
    if Path(module.__file__).resolve() != script.resolve():
        raise RuntimeError(f"imported {module.__file__} instead of {script}: another 'benchmarks' package "
                           f"shadows the checkout's; run `python -m benchmarks.{name}` in {root} instead")
    return module


def run(args) -> int:
    argv = list(args.bench_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return int(load_benchmark(args.name).main(argv) or 0)
