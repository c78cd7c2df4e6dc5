"""`step3 convert` / `step3 verify` through the CLI, and kill -9 at random points followed by --resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from converters import writer
from converters.convert import hf_to_afd
from converters.errors import Step3Error
from converters.layout import MANIFEST
from step3cli.convert import parse_size
from step3cli.main import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != writer.JOURNAL}


def test_convert_verify_and_back(tiny_fp8_ckpt, tmp_path):
    afd, hf = tmp_path / "afd", tmp_path / "hf"
    r = run("convert", tiny_fp8_ckpt, afd, "--ffn-ranks", "2", "--shard-size", "1MB", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["direction"] == "hf->afd" and result["skipped"] == []
    assert set(result["bytes_by_part"]) == {"attention", "ffn/rank-0", "ffn/rank-1", "top level"}
    r = run("verify", afd, "--against", tiny_fp8_ckpt)
    assert r.exit_code == 0 and "OK" in r.stdout, r.output
    r = run("convert", afd, hf, "--to", "hf")
    assert r.exit_code == 0 and "afd->hf" in r.stdout, r.output
    r = run("convert", tiny_fp8_ckpt, afd, "--ffn-ranks", "2", "--shard-size", "1MB", "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["written"] == [], r.output


def test_verify_reports_damage_by_name_and_exits_1(tiny_ckpt, tmp_path):
    afd = tmp_path / "afd"
    hf_to_afd(tiny_ckpt, afd, ffn_ranks=2)
    victim = sorted((afd / "ffn" / "rank-1").glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    r = run("verify", afd, "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert not report["ok"] and any(victim.name in p and "sha256" in p for p in report["problems"])


@pytest.mark.parametrize(("args", "message"), [
    (("--ffn-ranks", "3"), "does not divide moe_num_experts=8"),
    ((), "--ffn-ranks is required"),
    (("--ffn-ranks", "2", "--shard-size", "lots"), "--shard-size: cannot read 'lots'"),
])
def test_bad_flags_are_named(tiny_ckpt, tmp_path, args, message):
    r = run("convert", tiny_ckpt, tmp_path / "afd", *args)
    assert r.exit_code != 0 and isinstance(r.exception, Step3Error) and message in str(r.exception)


def test_parse_size():
    assert parse_size("4GB") == 4 * 10**9 and parse_size("1GiB") == 2**30 and parse_size("512") == 512
    assert parse_size("1.5 MB") == 1_500_000
    with pytest.raises(Step3Error):
        parse_size("0.1B")


def test_non_empty_out_is_refused_through_the_entry_point(tiny_ckpt, tmp_path):
    out = tmp_path / "afd"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cmd = [sys.executable, "-m", "step3cli.main", "convert", str(tiny_ckpt), str(out), "-F", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Error:" in proc.stderr and "--resume" in proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def _completed(out: Path) -> int:
    return sum(1 for p in out.rglob("*.safetensors"))


def test_kill_9_at_random_points_then_resume_is_byte_identical(tiny_fp8_ckpt, tmp_path):
    """Kill the CLI with SIGKILL at random points mid-conversion (waiting for a random number of finished
    files, then a random delay); after every kill no file may look complete without being so; a final
    --resume gives exactly the bytes of an uninterrupted run."""
    shard = "32KB"  # many small files, so kills land in the middle of the run
    ref = tmp_path / "ref"
    hf_to_afd(tiny_fp8_ckpt, ref, ffn_ranks=2, shard_size=parse_size(shard))
    reference, total = _files(ref), _completed(ref)
    rng, out = random.Random(8), tmp_path / "out"
    cmd = [sys.executable, "-m", "step3cli.main", "convert", str(tiny_fp8_ckpt), str(out), "-F", "2",
           "--shard-size", shard]
    kills = 0
    for attempt in range(6):
        proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        target = min(total - 1, (_completed(out) if out.exists() else 0) + rng.randint(1, total // 8))
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline and \
                not (out.exists() and _completed(out) >= target):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.01))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        for rel, data in _files(out).items():
            if not rel.endswith(writer.PARTIAL):  # whatever looks complete is complete and right
                assert data == reference[rel], f"{rel} looks complete but differs (kill {attempt})"
        if (out / MANIFEST).exists():
            break
    assert kills >= 4, f"only {kills} kills landed mid-run"
    hf_to_afd(tiny_fp8_ckpt, out, ffn_ranks=2, shard_size=parse_size(shard), resume=True)
    assert _files(out) == reference


def test_inspect_shows_the_plan_per_rank_bytes_and_attention_memory(tiny_vision_ckpt, tmp_path):
    afd = tmp_path / "afd"
    hf_to_afd(tiny_vision_ckpt, afd, ffn_ranks=4)
    r = run("inspect", afd, "--json", "--batch", "8", "--context", "1024")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    ranks, manifest = data["afd"], json.loads((afd / MANIFEST).read_text())
    assert data["source"]["kind"] == "afd"
    assert [f["experts"] for f in ranks["ffn"]] == [[0, 2], [2, 4], [4, 6], [6, 8]]
    on_disk = {part: sum(e["bytes"] for rel, e in manifest["files"].items() if rel.startswith(part + "/"))
               for part in ("attention", "vision", "ffn/rank-0")}
    headers = {part: sum(8 + int.from_bytes((afd / rel).read_bytes()[:8], "little")
                         for rel in manifest["files"] if rel.startswith(part + "/"))
               for part in on_disk}
    assert ranks["attention"]["bytes"] == on_disk["attention"] - headers["attention"]
    assert ranks["ffn"][0]["bytes"] == on_disk["ffn/rank-0"] - headers["ffn/rank-0"]
    assert sum(f["params"] for f in ranks["ffn"]) + ranks["attention"]["params"] == data["params"]["total"]
    kv = 8 * 1024 * data["kv_bytes_per_token"]["bf16"]
    weights = ranks["attention"]["bytes"] + ranks["vision"]["bytes"]
    assert ranks["attention"]["memory_per_rank_bytes"]["bf16"] == weights + kv
    r = run("inspect", afd, "--batch", "8")
    assert r.exit_code == 0 and "ffn/rank-3" in r.stdout and "6..7" in r.stdout


def test_inspect_reports_an_incomplete_layout(tiny_ckpt, tmp_path, monkeypatch):
    from converters import convert as convert_mod

    def crash(*args, **kw):
        raise KeyboardInterrupt

    out = tmp_path / "afd"
    monkeypatch.setattr(convert_mod, "read_piece", crash)
    with pytest.raises(KeyboardInterrupt):
        hf_to_afd(tiny_ckpt, out, ffn_ranks=2)
    r = run("inspect", out)
    assert r.exit_code != 0 and "INCOMPLETE" in str(r.exception) and "--resume" in str(r.exception)
