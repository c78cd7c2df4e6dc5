"""Timing, version and kernel-copy helpers shared by the GPU benchmarks (mfa_attention.py, moe_ffn.py, and
the diagnostic copies of mfa_cta_trace.py and moe_gemm_limits.py).

Each script keeps its own JSON layout; only the measuring is shared, so both time kernels the same way.
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton


def capture_graph(fn: Callable[[], object]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of fn, after one call on a side stream (compiles and warms up outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def event_median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of one call of fn over `reps` calls, each between two CUDA events (no warm-up)."""
    event = lambda: torch.cuda.Event(enable_timing=True)
    pairs = [(event(), event()) for _ in range(reps)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def interleaved_graph_ms(fns: dict[str, Callable[[], object]], reps: int, rounds: int = 5
                         ) -> dict[str, float]:
    """Median ms of one CUDA-graph replay of each fn, the fns taking turns in `rounds` rounds.

    The H200's clock follows its power draw: in moe_ffn's run 7 one cuBLAS FP8 GEMM ran 1.74 to 1.92 ms per
    launch depending on what ran around it, so timing one side after the other compares clock states, not
    code; a ratio bar needs both sides in turns.
    """
    graphs = {name: capture_graph(fn) for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, graph in graphs.items():
            times[name].append(time_ms(graph.replay, reps))
    return {name: statistics.median(t) for name, t in times.items()}


def time_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of one call over `reps` event-timed calls, after 2 warm-up calls."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    return event_median_ms(fn, reps)


def gpu_versions() -> dict:
    """The software a GPU result depends on, for the machine block of each result JSON."""
    return dict(torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                python=platform.python_version())


def edited_source(source: Path, edits: list[tuple], tool: str) -> str:
    """source's text with each (anchor, replacement[, copies]) edit applied; a kernel file that lost an anchor
    stops the tool with an error naming it (the diagnostic copies follow the library's code, never drift)."""
    src = source.read_text()
    for anchor, new, *copies in edits:
        count, expected = src.count(anchor), copies[0] if copies else 1
        if count != expected:
            raise SystemExit(f"{tool}: {source.name} has {count} copies of {anchor.strip()[:80]!r} "
                             f"(expected {expected}): bring {tool} up to date")
        src = src.replace(anchor, new)
    return src


def load_source(text: str, stem: str):
    """A module made from text, imported from a temporary file (Gluon and Triton read a kernel's source)."""
    path = Path(tempfile.mkdtemp()) / f"{stem}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clocks_under_load(calls: dict[str, Callable[[], object]], before: dict[str, Callable[[], object]],
                      seconds: float = 1.5) -> dict[str, dict]:
    """Each call run back to back for `seconds` while nvidia-smi samples the SM clock and the board power
    every 50 ms: the medians over the last two thirds (the clock settles within ~40 ms of load, NOTES_ffn.md
    run 10), and the time per call. Says whether a kernel's speed is its own or the clock its power draw gets
    under the H200's cap. before: name -> what to run first (a GEMM that reads what another one writes)."""
    query = ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"]
    out = {}
    for name, fn in calls.items():
        if name in before:
            before[name]()
        sampler = subprocess.Popen(query, stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # nvidia-smi's own start
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
            if n % 20 == 0:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0  # the calls still queued at `seconds` included
        sampler.terminate()
        lines = sampler.communicate()[0].strip().splitlines()
        samples = [tuple(float(v) for v in line.split(",")) for line in lines if line.count(",") == 1]
        steady = samples[len(samples) // 3:]
        out[name] = dict(sm_mhz=statistics.median(c for c, _ in steady),
                         watts=statistics.median(w for _, w in steady), samples=len(steady), calls=n,
                         ms_per_call=elapsed * 1e3 / n)
        time.sleep(0.5)
    return out
