"""`step3 demo`: runs end to end in a temporary workdir, reuses its checkpoint, refuses foreign files."""

from __future__ import annotations

import tempfile

import torch
from typer.testing import CliRunner

from converters.errors import Step3Error
from runtime.chat import ChatTokenizer
from runtime.demo import STEPS, run_demo
from runtime.model.reference import Step3Reference
from step3cli.main import app


def test_demo_cli_runs_and_prints_the_generated_text(tmp_path) -> None:
    runner = CliRunner()
    args = ["demo", "--workdir", str(tmp_path), "--prompt", "Say hi", "--max-new-tokens", "6"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for number, (_, title, _) in enumerate(STEPS, start=1):
        assert f"{number}. {title}" in result.stdout
    reply_line = result.stdout.strip().splitlines()[-1]
    assert reply_line.startswith("Generated text: ") and len(reply_line) > len("Generated text: ")
    assert (tmp_path / "hf" / "config.json").is_file()
    again = runner.invoke(app, args)  # the second run finds the checkpoint and reuses it
    assert again.exit_code == 0 and "reused" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == reply_line  # greedy: the same reply


def test_demo_reply_is_the_greedy_continuation_of_the_chat_prompt(tmp_path) -> None:
    seen: list[str] = []
    result = run_demo(tmp_path, "What is MFA?", max_new_tokens=5, on_step=lambda r: seen.append(r.name))
    assert seen == [name for name, _, _ in STEPS] == [r.name for r in result.steps]
    tok = ChatTokenizer.from_pretrained(tmp_path / "hf")
    model = Step3Reference.from_pretrained(tmp_path / "hf")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is MFA?"}]))
    assert ids[0] == tok.bos_token_id
    out = model.generate(torch.tensor([ids]), 5, eos_token_id=list(tok.stop_token_ids))
    assert result.reply == tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    facts = {r.name: r.facts for r in result.steps}
    assert facts["inspect"]["parameters"].startswith(f"{model.cfg.num_params()['total']:,} total")
    assert facts["chat"]["prompt tokens"] == str(len(ids))


def test_demo_refuses_a_workdir_holding_something_else(tmp_path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--max-new-tokens", "2"])
    assert result.exit_code != 0 and isinstance(result.exception, Step3Error)
    assert "not a valid step3-tiny demo checkpoint" in str(result.exception)
    assert str(tmp_path / "hf") in str(result.exception)
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"  # nothing of the user's is touched


def test_demo_checks_its_inputs(tmp_path) -> None:
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--max-new-tokens", "0"])
    assert result.exit_code == 2 and "--max-new-tokens" in result.output
    result = CliRunner().invoke(app, ["demo", "--workdir", str(tmp_path), "--prompt", "  "])
    assert isinstance(result.exception, Step3Error) and "--prompt" in str(result.exception)


def test_demo_tmp_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where TemporaryDirectory creates its dirs
    result = CliRunner().invoke(app, ["demo", "--tmp", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "Generated text: " in result.stdout
    assert list(tmp_path.iterdir()) == []  # the scratch workdir is gone
