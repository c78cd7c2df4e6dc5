"""Is `step3 convert` I/O bound? Time it against `cp -r` of the same checkpoint, and measure its peak RSS.

    python benchmarks/convert_speed.py --work /tmp/convert-bench --repeats 5
        -> benchmarks/results/convert_speed_cpu.json

Synthesizes step3-small (BF16, ~0.8 GB) once with `step3 synth`, then, in turn (order rotated every
repeat): `cp -r SRC`, the library call `hf_to_afd(SRC, --ffn-ranks 2)` in this process, and the CLI
`step3 convert` as a subprocess, as a user runs it (interpreter start and imports included, torch not
among them; measured apart as `cli_startup`). Each run starts
after a `sync` and is timed twice: when it returns ("page cache": the source is warm, since caches
cannot be dropped here, and the output sits in memory) and after the `sync` that follows
("durable": the bytes are on the disk); its CPU seconds are recorded too. Reported: all times,
medians, ratios to cp, the CPU cost of one sha256 pass over the checkpoint (what a checksummed copy
pays on top of `cp`), and the floor: (cp's CPU s + that pass) / cores. The machine is shared: the
run waits (up to --wait-load s) for the 1-minute load average to fall below --max-load (before the
first repeat, and a while before each other), and records it before, after each repeat, and after.
Peak RSS comes from `/usr/bin/time -v` around the CLI, for step3-small and step3-tiny (RSS must not
grow with the checkpoint) and for a bare import of the CLI and the converter (the interpreter floor).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "step3cli.main"]


def _cpu() -> float:
    """CPU seconds (user + system) of this process, its threads and its finished children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(run) -> tuple[float, float, float]:
    """(s until `run` returns, s until its output is synced to disk, CPU s), from a synced start."""
    os.sync()
    start, cpu = time.perf_counter(), _cpu()
    run()
    returned, used = time.perf_counter(), _cpu() - cpu
    os.sync()
    return returned - start, time.perf_counter() - start, used


def sha256_floor(src: Path) -> float:
    """CPU seconds to sha256 every file of `src` once on one core (from the page cache): what any
    checksummed copy must spend beyond a plain copy."""
    from converters.writer_io import sha256_file

    start = time.process_time()
    for f in sorted(src.iterdir()):
        sha256_file(f)
    return time.process_time() - start


def floor(times: dict, sha_cpu: float) -> dict:
    """The least a checksummed copy can take here: cp's CPU seconds plus one sha256 pass, spread perfectly
    over every core (the page-cache bound; a lower one than any real overlap reaches)."""
    cores = os.cpu_count() or 1
    seconds = (times["cp"]["median_cpu_s"] + sha_cpu) / cores
    return {"cores": cores, "page_cache_s": round(seconds, 3),
            "ratio_to_cp_page_cache": round(seconds / times["cp"]["median_page_cache_s"], 2)}


def peak_rss_kb(cmd: list[str]) -> int:
    """Maximum resident set size of `cmd` (kB): the kernel's ru_maxrss of that child, as GNU time -v
    reports it (wait4, so no /usr/bin/time is needed)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return usage.ru_maxrss


def wait_for_quiet(max_load: float, wait_s: float) -> float:
    """Wait until the 1-minute load average is below `max_load` (other jobs would steal the 2 cores and
    skew the ratios), at most `wait_s` seconds; returns the load at the start."""
    deadline = time.monotonic() + wait_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(10)
    return os.getloadavg()[0]


def cli_startup(repeats: int) -> dict:
    """Seconds before `step3 convert` moves a byte: `--help` (interpreter + CLI), and importing the
    conversion library (numpy, not torch), each the median of `repeats` runs."""
    def run(cmd: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    out = {}
    for name, cmd in (("convert_help_s", [*CLI, "convert", "--help"]),
                      ("import_converters_convert_s", [sys.executable, "-c", "import converters.convert"])):
        out[name] = round(statistics.median(run(cmd) for _ in range(repeats)), 3)
    return out


def checkpoint_facts(path: Path) -> dict:
    from converters.hf import HFCheckpoint

    with HFCheckpoint(path) as ckpt:
        infos = [ckpt.info(n) for n in ckpt.names()]
        largest = max(infos, key=lambda i: i.nbytes)
        files = [p for p in path.iterdir() if p.is_file()]
        return {"path": str(path), "bytes": sum(p.stat().st_size for p in files), "files": len(files),
                "tensors": len(infos), "largest_tensor": largest.name, "largest_tensor_bytes": largest.nbytes}


def machine() -> dict:
    import safetensors
    import torch

    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text(), Path("/proc/meminfo").read_text()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if "model name" in ln), "?")
    mem = next((ln.split()[1] for ln in meminfo.splitlines() if ln.startswith("MemTotal")), "0")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": round(int(mem) / 2**20, 1),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "safetensors": safetensors.__version__, "step3_commit": commit.stdout.strip()}


def synth(out: Path, preset: str) -> Path:
    if not (out / "config.json").is_file():
        subprocess.run([*CLI, "synth", str(out), "--preset", preset, "--shards", "4", "--force"], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def _library(src: Path, dst: Path, ffn_ranks: int) -> None:
    from converters.convert import hf_to_afd

    hf_to_afd(src, dst, ffn_ranks=ffn_ranks)


def _median_table(runs: dict[str, list[tuple[float, float, float]]]) -> dict:
    """Medians (the bar) and ratios to cp; also the best runs and their ratio, since on this VM the kernel's
    copy time now and then doubles for a run, `cp` included, which can move a median of few repeats."""
    out = {}
    for name, times in runs.items():
        page, durable, cpu = zip(*times, strict=True)
        out[name] = {"page_cache_s": [round(x, 3) for x in page], "durable_s": [round(x, 3) for x in durable],
                     "cpu_s": [round(x, 3) for x in cpu],
                     "median_page_cache_s": round(statistics.median(page), 3),
                     "median_durable_s": round(statistics.median(durable), 3),
                     "median_cpu_s": round(statistics.median(cpu), 3),
                     "best_page_cache_s": round(min(page), 3), "best_durable_s": round(min(durable), 3)}
    for name in ("convert_library", "convert_cli"):
        for kind in ("page_cache", "durable"):
            for stat in ("median", "best"):
                ratio = out[name][f"{stat}_{kind}_s"] / out["cp"][f"{stat}_{kind}_s"]
                key = f"ratio_to_cp_{kind}" if stat == "median" else f"best_ratio_to_cp_{kind}"
                out[name][key] = round(ratio, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/step3-convert-bench"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ffn-ranks", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/convert_speed_cpu.json")
    ap.add_argument("--max-load", type=float, default=1.5, help="start when the 1-min load is below this")
    ap.add_argument("--wait-load", type=float, default=300, help="seconds to wait for that, at most")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    src, tiny = synth(args.work / "small", "step3-small"), synth(args.work / "tiny", "step3-tiny")
    dst = args.work / "out"
    cli = [*CLI, "convert", str(src), str(dst), "--ffn-ranks", str(args.ffn_ranks)]
    kinds = {"cp": lambda: subprocess.run(["cp", "-r", str(src), str(dst)], check=True),
             "convert_library": lambda: _library(src, dst, args.ffn_ranks),
             "convert_cli": lambda: subprocess.run(cli, check=True, stdout=subprocess.DEVNULL)}
    runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    _library(src, dst, args.ffn_ranks)  # warm-up: imports, and the output's first allocation
    shutil.rmtree(dst, ignore_errors=True)
    waited_for = wait_for_quiet(args.max_load, args.wait_load)
    load_before, load_during = os.getloadavg(), []
    for i in range(args.repeats):
        if i:
            wait_for_quiet(args.max_load, args.wait_load / args.repeats)  # and between repeats
        order = list(kinds)[i % 3:] + list(kinds)[:i % 3]
        for name in order:
            shutil.rmtree(dst, ignore_errors=True)
            runs[name].append(timed(kinds[name]))
        load_during.append(round(os.getloadavg()[0], 2))
    shutil.rmtree(dst, ignore_errors=True)
    load_after = os.getloadavg()
    small_kb = peak_rss_kb(cli)
    rss = {"convert_step3_small_kb": small_kb,
           "convert_step3_tiny_kb": peak_rss_kb([*CLI, "convert", str(tiny), str(args.work / "out-tiny"),
                                                 "--ffn-ranks", str(args.ffn_ranks), "--force"]),
           "import_only_kb": peak_rss_kb([sys.executable, "-c", "import step3cli.main, converters.convert"])}
    shutil.rmtree(dst, ignore_errors=True)
    facts = checkpoint_facts(src)
    sha_cpu, times = round(sha256_floor(src), 3), _median_table(runs)
    result = {
        "what": "step3 convert (HF -> AFD) vs cp -r of the same checkpoint, alternated in one run",
        "machine": machine(), "load_average_before": load_before, "load_average_after": load_after,
        "load_1min_after_each_repeat": load_during, "load_1min_when_started": round(waited_for, 2),
        "max_load_wanted": args.max_load, "cli_startup": cli_startup(args.repeats),
        "checkpoint": {"preset": "step3-small", "dtype": "BF16", **facts}, "ffn_ranks": args.ffn_ranks,
        "repeats": args.repeats, "times": times,
        "sha256_all_files_one_core_cpu_s": sha_cpu,
        "floor": floor(times, sha_cpu),
        "peak_rss": {**rss, "largest_tensor_bytes": facts["largest_tensor_bytes"],
                     "convert_small_minus_import_kb": small_kb - rss["import_only_kb"],
                     "convert_small_minus_tiny_kb": small_kb - rss["convert_step3_tiny_kb"]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    t = result["times"]
    print(f"{'median (best)':18}{'page cache s':>14}{'ratio':>13}{'durable s':>11}{'ratio':>13}{'CPU s':>8}")
    for name in kinds:
        r = t[name]
        ratios = [f"{r.get(f'ratio_to_cp_{k}', '')} ({r.get(f'best_ratio_to_cp_{k}', '')})" * (name != "cp")
                  for k in ("page_cache", "durable")]
        print(f"{name:18}{r['median_page_cache_s']:>7} ({r['best_page_cache_s']}){ratios[0]:>13}"
              f"{r['median_durable_s']:>6} ({r['best_durable_s']}){ratios[1]:>13}{r['median_cpu_s']:>8}")
    print(f"CLI startup: {result['cli_startup']}; load (1 min) per repeat: {load_during}")
    print(f"sha256 of every source file, one core: {result['sha256_all_files_one_core_cpu_s']} CPU s; floor "
          f"(cp CPU + sha256) / {result['floor']['cores']} cores: {result['floor']['page_cache_s']} s = "
          f"{result['floor']['ratio_to_cp_page_cache']}x cp")
    print(f"peak RSS: small {small_kb / 1e3:.0f} MB, tiny {rss['convert_step3_tiny_kb'] / 1e3:.0f} MB, "
          f"import only "
          f"{rss['import_only_kb'] / 1e3:.0f} MB; largest tensor "
          f"{facts['largest_tensor_bytes'] / 1e6:.1f} MB ({facts['largest_tensor']})")


if __name__ == "__main__":
    main()
