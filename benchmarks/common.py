"""Timing, memory-bandwidth and reporting helpers shared by the benchmark scripts.

The GPU protocol follows FlashInfer's: CUDA events around each run, the L2 cache flushed
before every run by writing a buffer larger than L2 ("cold" numbers, the ones compared with
the memory roofline), and the same runs back to back without the flush ("warm" numbers).
On the CPU: wall-clock (``time.perf_counter``) medians after a warm-up, with the
implementations interleaved run by run so that a change in background load hits them all alike.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Peak DRAM bandwidth in GB/s (1e9 bytes/s) of known GPUs, from the vendors' data sheets.
# Matched in order against the lower-cased device name; every pattern of an entry must occur.
KNOWN_PEAK_BANDWIDTH_GBPS: Tuple[Tuple[Tuple[str, ...], float], ...] = (
    (("gh200",), 4000.0),
    (("h200",), 4800.0),
    (("h100", "nvl"), 3900.0),
    (("h100", "pcie"), 2000.0),
    (("h100", "sxm"), 3350.0),
    (("h100", "hbm3"), 3350.0),       # "NVIDIA H100 80GB HBM3" is the SXM part
    (("h800", "pcie"), 2000.0),
    (("h800",), 3350.0),
    (("a100", "pcie", "40gb"), 1555.0),
    (("a100", "pcie"), 1935.0),       # A100 PCIe 80GB
    (("a100", "40gb"), 1555.0),
    (("a100", "80gb"), 2039.0),       # A100 SXM 80GB
    (("a100",), 1555.0),
    (("a800",), 2039.0),
    (("l40s",), 864.0),
    (("l40",), 864.0),
    (("l4",), 300.0),
    (("a10g",), 600.0),
    (("a10",), 600.0),
    (("rtx 4090",), 1008.0),
    (("rtx 3090",), 936.0),
    (("v100",), 900.0),
    (("tesla t4",), 320.0),
)


# ----------------------------------------------------------------------------------------------
# Device description
# ----------------------------------------------------------------------------------------------

def select_device(name: Optional[str], threads: Optional[int] = None) -> torch.device:
    """The benchmark device (``--device``; default CUDA when available) and CPU thread count (``--threads``)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    return device


def cpu_model_name() -> str:
    """The CPU model as the OS reports it (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device`` (GPU product name, or the CPU model)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model_name()


def device_slug(device: torch.device) -> str:
    """File-name-safe device name: ``"cpu"`` for the CPU, else the GPU name in lower-case words.

    Example:
        ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    return slugify(device_name(device))


def slugify(text: str) -> str:
    """Lower-case ``text`` with every run of non-alphanumerics turned into one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def peak_bandwidth(device: torch.device, name: Optional[str] = None) -> Tuple[Optional[float], str]:
    """Peak DRAM bandwidth of a GPU in bytes/s and where the number comes from.

    Looks ``name`` (default: the device's name) up in :data:`KNOWN_PEAK_BANDWIDTH_GBPS`; else
    estimates ``2 (DDR) * memory clock * bus width / 8`` from ``torch.cuda.get_device_properties``
    when the properties expose them. Returns ``(None, reason)`` for the CPU or an unknown GPU.

    Example:
        >>> peak_bandwidth(torch.device("cuda"), "NVIDIA H100 PCIe")
        (2000000000000.0, 'table: NVIDIA H100 PCIe')
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None, "not measured on the CPU"
    if name is None:
        name = device_name(device)
    peak = lookup_peak_bandwidth(name)
    if peak is not None:
        return peak, f"table: {name}"
    try:
        props = torch.cuda.get_device_properties(device)
        clock_khz = getattr(props, "memory_clock_rate", 0) or 0
        bus_bits = getattr(props, "memory_bus_width", 0) or 0
    except Exception as exc:  # no driver, property missing
        return None, f"unknown GPU {name!r} and no memory clock/bus width ({type(exc).__name__}: {exc})"
    if clock_khz > 0 and bus_bits > 0:
        est = estimate_peak_bandwidth(clock_khz, bus_bits)
        return est, f"estimate: 2 x {clock_khz} kHz x {bus_bits} bit / 8"
    return None, f"unknown GPU {name!r} and no memory clock/bus width in its properties"


def lookup_peak_bandwidth(name: str) -> Optional[float]:
    """Peak bandwidth in bytes/s of a GPU named ``name`` from the table, or None when unknown."""
    low = name.lower()
    for patterns, gbps in KNOWN_PEAK_BANDWIDTH_GBPS:
        if all(p in low for p in patterns):
            return gbps * 1e9
    return None


def estimate_peak_bandwidth(memory_clock_khz: float, memory_bus_width_bits: float) -> float:
    """``2 * clock * bus width / 8`` bytes/s (double data rate), e.g. H100 SXM: 2619 MHz x 5120 bit ~ 3.35 TB/s."""
    return 2.0 * float(memory_clock_khz) * 1e3 * float(memory_bus_width_bits) / 8.0


def environment(device: torch.device) -> dict:
    """Versions, threads, date and device description recorded in every result file."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import transformers
        transformers_version = transformers.__version__
    except Exception:
        transformers_version = None
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers_version,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model_name(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    dev = {"type": device.type, "name": device_name(device), "slug": device_slug(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        peak, source = peak_bandwidth(device)
        dev.update({
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
            "peak_bandwidth_GBps": None if peak is None else peak / 1e9,
            "peak_bandwidth_source": source,
        })
    env["device"] = dev
    return env


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def summarize(times_ms: Sequence[float]) -> dict:
    """Median, mean, min, max, 10th/90th percentile and count of a list of times in ms."""
    if not times_ms:
        raise ValueError("times_ms: expected at least one time, got an empty sequence")
    s = sorted(times_ms)

    def pct(q):
        return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]

    return {"median_ms": statistics.median(s), "mean_ms": statistics.fmean(s), "min_ms": s[0],
            "max_ms": s[-1], "p10_ms": pct(0.1), "p90_ms": pct(0.9), "runs": len(s)}


def median_ci(values: Sequence[float], level: float = 0.95, resamples: int = 4000, seed: int = 0) -> Tuple[float, float]:
    """A bootstrap confidence interval ``(low, high)`` of the median of ``values`` (percentile method,
    ``resamples`` resamples with replacement, seeded: the same values give the same interval).

    For per-round ratios of two configurations timed side by side: an interval above 1 says the
    difference is larger than the spread between rounds, not one lucky round.

    Example:
        >>> lo, hi = median_ci([1.02, 0.98, 1.05, 1.01, 1.03])
        >>> lo <= 1.02 <= hi
        True
    """
    import random
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values: expected at least one value, got an empty sequence")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a fraction in (0, 1), got {level}")
    rng = random.Random(seed)
    n = len(vals)
    meds = sorted(statistics.median(rng.choices(vals, k=n)) for _ in range(int(resamples)))
    tail = (1.0 - level) / 2.0
    return meds[int(tail * (len(meds) - 1))], meds[int(round((1.0 - tail) * (len(meds) - 1)))]


def time_cpu_interleaved(fns: Dict[str, Callable[[], object]], repeat: int, warmup: int = 2,
                         max_seconds: Optional[float] = None, primed: bool = False) -> Dict[str, List[float]]:
    """Wall-clock times (ms) of each callable, run round-robin: one run of each per round.

    ``warmup`` untimed rounds come first. Stops after ``repeat`` rounds, or earlier once
    ``max_seconds`` have passed and at least 3 rounds are done (the CPU may be shared).
    Round-robin, each callable starts with caches holding the others' data (its inputs come from
    memory: "cold"); ``primed=True`` runs each callable once, untimed, right before its timed run,
    so its inputs are in cache ("warm", as when the logits were just written by the lm_head).

    Example:
        >>> t = time_cpu_interleaved({"a": lambda: sum(range(1000))}, repeat=5)
        >>> len(t["a"])
        5
    """
    if repeat < 1:
        raise ValueError(f"repeat: expected >= 1, got {repeat}")
    for _ in range(max(0, warmup)):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    for r in range(repeat):
        for name, fn in fns.items():
            if primed:
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if max_seconds is not None and r >= 2 and time.perf_counter() - start > max_seconds:
            break
    return times


class L2Flusher:
    """Evicts the GPU's L2 cache by writing a buffer larger than it (``2 x L2``, at least 256 MiB)."""

    def __init__(self, device: torch.device):
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        self.nbytes = max(2 * l2, 256 * 2**20)
        self.buffer = torch.empty(self.nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


_CYCLES_PER_MS: Optional[float] = None


def _sleep_cycles_per_ms() -> Optional[float]:
    """GPU clock cycles per millisecond of ``torch.cuda._sleep``, measured once; None if unsupported."""
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        try:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)          # load the kernel
            start.record()
            torch.cuda._sleep(2_000_000)
            end.record()
            torch.cuda.synchronize()
            _CYCLES_PER_MS = 2_000_000 / max(start.elapsed_time(end), 1e-3)
        except Exception:
            _CYCLES_PER_MS = 0.0
    return _CYCLES_PER_MS or None


def time_cuda(fn: Callable[[], object], repeat: int, warmup: int = 5,
              flusher: Optional[L2Flusher] = None, chunk: int = 20) -> List[float]:
    """Per-run GPU times in ms measured with CUDA events on the current stream.

    With ``flusher`` the L2 cache is flushed before each run (outside the timed interval).
    The runs are issued in chunks behind a GPU sleep long enough for the host to queue the whole
    chunk, so the events time the GPU work, not Python and launch overhead (a call that
    synchronises internally still works, it then includes its host time).
    """
    if repeat < 1:
        raise ValueError(f"repeat: expected >= 1, got {repeat}")
    for _ in range(max(0, warmup)):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        if flusher is not None:
            flusher()
        fn()
    host_ms = (time.perf_counter() - t0) / 3 * 1e3      # host time to queue one run
    torch.cuda.synchronize()
    cycles_per_ms = _sleep_cycles_per_ms()
    times: List[float] = []
    for c0 in range(0, repeat, chunk):
        n = min(chunk, repeat - c0)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        if cycles_per_ms:
            torch.cuda._sleep(int(cycles_per_ms * min(1.5 * n * host_ms + 0.5, 1000.0)))
        for i in range(n):
            if flusher is not None:
                flusher()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times += [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return times


def time_cuda_latency(fn: Callable[[], object], repeat: int, warmup: int = 5) -> List[float]:
    """End-to-end wall-clock ms per call, ``torch.cuda.synchronize()`` included (host + launch + GPU)."""
    for _ in range(max(0, warmup)):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


# ----------------------------------------------------------------------------------------------
# Bytes and roofline
# ----------------------------------------------------------------------------------------------

def bandwidth_report(bytes_moved: float, time_ms: float, peak_bytes_per_s: Optional[float]) -> dict:
    """Achieved bandwidth and the roofline ratio ``time / (bytes / peak)`` (1.0 = at the memory roofline).

    Example:
        >>> bandwidth_report(3.35e9, 1000.0, 3.35e12)["roofline_ratio"]
        1000.0
    """
    if time_ms <= 0:
        raise ValueError(f"time_ms: expected > 0, got {time_ms}")
    achieved = bytes_moved / (time_ms * 1e-3)
    out = {"bytes": int(bytes_moved), "achieved_GBps": achieved / 1e9}
    if peak_bytes_per_s:
        floor_ms = bytes_moved / peak_bytes_per_s * 1e3
        out.update({"peak_fraction": achieved / peak_bytes_per_s, "roofline_ms": floor_ms,
                    "roofline_ratio": time_ms / floor_ms})
    return out


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------

def format_table(rows: Iterable[Sequence[object]], header: Sequence[str]) -> str:
    """Plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(h) for h in header]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON to ``path`` (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False)
        fh.write("\n")
    return path


def parse_int_list(text: str, name: str) -> List[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``; ValueError naming ``name`` on anything else."""
    try:
        vals = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated positive integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise ValueError(f"{name}: expected comma-separated positive integers, got {text!r}")
    return vals
