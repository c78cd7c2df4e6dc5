"""`step3 --help` and argument errors must not pay for torch: command modules import the library lazily."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

from converters.convert import DEFAULT_SHARD_SIZE
from step3cli.convert import convert, parse_size
from step3cli.quantize import quantize

HEAVY = ("torch", "numpy", "safetensors", "tokenizers", "triton")


def test_importing_the_cli_loads_no_heavy_library():
    code = f"import sys, step3cli.main; print([m for m in {HEAVY!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_help_and_argument_errors_run_without_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom step3cli.main import app\n"
            "runner = CliRunner()\n"
            "for args in (['--help'], ['convert', '--help'], ['quantize', '--help'], ['inspect', '--help'],\n"
            "             ['demo', '--help'], ['convert'], ['verify', 'a', '--bogus']):\n"
            "    r = runner.invoke(app, args)\n"
            "    assert (r.exit_code == 0) == ('--help' in args), (args, r.exit_code, r.output)\n"
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_cli_shard_size_defaults_match_the_library():
    for command in (convert, quantize):
        default = inspect.signature(command).parameters["shard_size"].default
        assert parse_size(default) == DEFAULT_SHARD_SIZE, command.__name__


# Each command runs as a user runs it (step3cli.main.main in a fresh interpreter); afterwards the
# process must not have imported torch: converting and verifying only move and compare bytes.
_RUN_AND_REPORT = """
import json, sys
from step3cli.main import main
sys.argv = ['step3', *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({'code': code, 'torch': 'torch' in sys.modules}))
"""


def _run_cli(*args: object) -> dict:
    r = subprocess.run([sys.executable, "-c", _RUN_AND_REPORT, json.dumps([str(a) for a in args])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_convert_verify_and_back_run_without_torch(tiny_fp8_ckpt, tmp_path: Path):
    afd, hf = tmp_path / "afd", tmp_path / "hf"
    # FP8 with F=2: whole tensors, expert ranges (dim 0) and TP column slices of down_proj (dim 1)
    for args in (("convert", tiny_fp8_ckpt, afd, "-F", "2", "--shard-size", "1MB"),
                 ("verify", afd),
                 ("verify", afd, "--against", tiny_fp8_ckpt),
                 ("convert", afd, hf, "--to", "hf")):
        assert _run_cli(*args) == {"code": 0, "torch": False}, args
    layout = json.loads((afd / "manifest.json").read_text())
    assert any(t["slice"] and t["slice"][0][0] == 1 for t in layout["tensors"].values())
    index = "model.safetensors.index.json"
    names = [json.loads((d / index).read_text())["weight_map"].keys() for d in (tiny_fp8_ckpt, hf)]
    assert set(names[0]) == set(names[1])  # the bytes: tests/converters/test_convert.py round trips
