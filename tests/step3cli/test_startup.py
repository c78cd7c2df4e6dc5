"""`step3 --help` and argument errors must not pay for torch: command modules import the library lazily."""

from __future__ import annotations

import inspect
import subprocess
import sys

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
