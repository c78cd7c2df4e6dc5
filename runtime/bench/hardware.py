"""Accelerators as data: price, peak rates and network, from the paper's Table 4 or a datasheet.

`flops` is the dense tensor-core rate the paper uses: FP8 where the chip has it, else BF16 (A800,
Ascend 910B). Network is the per-GPU NIC rate; an 8-GPU server has 8 of them. H100 and H200 carry
datasheet rates but no price: the user gives one (`--price H200=3.5`). A TOML/JSON file adds more:

    [accelerators.MyGPU]        # JSON: {"accelerators": {"MyGPU": {...}}}
    usd_per_hour = 1.2
    tflops = 900                # dense FP8 (or BF16 if no FP8)
    memory_tbps = 3.0           # HBM bandwidth, TB/s
    network_gbps = 400          # per-GPU NIC, Gbit/s
    memory_gb = 96              # optional (planner memory check); default 80
    gpus_per_server = 8         # optional
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from converters.errors import Step3Error


@dataclass(frozen=True)
class Accelerator:
    name: str
    usd_per_hour: float | None  # None: no price known; cost tables need one (--price NAME=USD)
    flops: float  # dense FLOP/s (FP8, or BF16 where there is no FP8)
    memory_bw: float  # HBM bytes/s
    network_gbps: float  # per-GPU NIC, Gbit/s
    memory_bytes: float = 80e9
    gpus_per_server: int = 8
    flops_dtype: str = "FP8"
    source: str = "paper Table 4"

    @property
    def server_network_bw(self) -> float:
        """Bytes/s of one 8-GPU server's NICs together (Table 7's network term)."""
        return self.gpus_per_server * self.network_gbps * 1e9 / 8

    @property
    def gpu_network_bw(self) -> float:
        return self.network_gbps * 1e9 / 8

    @property
    def usd_per_second(self) -> float:
        if self.usd_per_hour is None:
            raise Step3Error(f"accelerator {self.name} has no price; pass --price {self.name}=USD_PER_HOUR")
        return self.usd_per_hour / 3600

    @property
    def ridge(self) -> float:
        """FLOP per byte where compute and memory time are equal (roofline ridge point)."""
        return self.flops / self.memory_bw


PAPER_HARDWARE: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("H800", 2.0, 1.98e15, 3.35e12, 400, memory_bytes=80e9),
    Accelerator("H20", 0.8, 2.96e14, 4.0e12, 400, memory_bytes=96e9),
    Accelerator("A800", 0.75, 3.12e14, 2.0e12, 200, memory_bytes=80e9, flops_dtype="BF16"),
    Accelerator("910B", 0.67, 2.8e14, 1.6e12, 200, memory_bytes=64e9, flops_dtype="BF16"),
)}

# NVIDIA datasheets (SXM, dense, no sparsity); ConnectX-7 400 Gb/s per GPU. Price is the user's.
DATASHEET_HARDWARE: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("H100", None, 1.979e15, 3.35e12, 400, memory_bytes=80e9, source="NVIDIA H100 SXM datasheet"),
    Accelerator("H200", None, 1.979e15, 4.8e12, 400, memory_bytes=141e9, source="NVIDIA H200 SXM datasheet"),
)}

_FIELDS = {"usd_per_hour": 1.0, "tflops": 1e12, "memory_tbps": 1e12, "network_gbps": 1.0}


def builtin_hardware() -> dict[str, Accelerator]:
    return {**PAPER_HARDWARE, **DATASHEET_HARDWARE}


def _read_table(path: Path) -> dict:
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise Step3Error(f"{path}: not valid JSON ({e})") from None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise Step3Error(f"{path}: reading TOML needs Python 3.11+; write the same table as JSON "
                         f"(a .json file) instead") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise Step3Error(f"{path}: not valid TOML ({e})") from None


def _parse_accelerator(path: Path, name: str, d: object) -> Accelerator:
    where = f"{path}: accelerators.{name}"
    if not isinstance(d, dict):
        raise Step3Error(f"{where} must be a table of fields")
    missing = [k for k in _FIELDS if k not in d]
    if missing:
        raise Step3Error(f"{where}: missing field(s) {', '.join(missing)} (needed: {', '.join(_FIELDS)})")
    values = {}
    for key in (*_FIELDS, "memory_gb", "gpus_per_server"):
        if key in d:
            v = d[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise Step3Error(f"{where}: field '{key}' must be a positive number, got {v!r}")
            values[key] = float(v)
    return Accelerator(name=name, usd_per_hour=values["usd_per_hour"], flops=values["tflops"] * 1e12,
                       memory_bw=values["memory_tbps"] * 1e12, network_gbps=values["network_gbps"],
                       memory_bytes=values.get("memory_gb", 80.0) * 1e9,
                       gpus_per_server=int(values.get("gpus_per_server", 8)),
                       flops_dtype=str(d.get("flops_dtype", "FP8")), source=str(path))


def load_hardware_file(path: str | Path) -> dict[str, Accelerator]:
    """User accelerators from TOML or JSON: a top-level `accelerators` table of name -> fields."""
    path = Path(path)
    if not path.is_file():
        raise Step3Error(f"{path}: hardware file not found (--hardware-file takes a .toml or .json file)")
    table = _read_table(path)
    accs = table.get("accelerators") if isinstance(table, dict) else None
    if not isinstance(accs, dict) or not accs:
        raise Step3Error(f"{path}: expected a top-level 'accelerators' table with one entry per accelerator")
    return {name: _parse_accelerator(path, name, d) for name, d in accs.items()}


def resolve_hardware(names: list[str], prices: dict[str, float] | None = None,
                     extra: dict[str, Accelerator] | None = None) -> list[Accelerator]:
    """Look up accelerators by name (case-insensitive), applying user prices; unknown names list the known."""
    known = {**builtin_hardware(), **(extra or {})}
    by_key = {k.lower(): v for k, v in known.items()}
    for name in prices or {}:
        if name.lower() not in by_key:
            raise Step3Error(f"--price names unknown accelerator {name!r}; known: {', '.join(known)}")
    priced = {k: (replace(v, usd_per_hour=p) if (p := _price_for(v.name, prices)) is not None else v)
              for k, v in by_key.items()}
    out = []
    for name in names:
        acc = priced.get(name.strip().lower())
        if acc is None:
            raise Step3Error(f"unknown accelerator {name!r} in --hardware; known: {', '.join(known)} "
                             f"(add your own with --hardware-file)")
        out.append(acc)
    return out


def _price_for(name: str, prices: dict[str, float] | None) -> float | None:
    for k, v in (prices or {}).items():
        if k.lower() == name.lower():
            return v
    return None
