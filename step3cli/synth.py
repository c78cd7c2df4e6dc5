"""`step3 synth`: write a synthetic Step-3 checkpoint (random weights, real format) from a preset."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from converters.config import PRESETS, Step3Config, get_preset
from converters.errors import Step3Error
from step3cli.render import byte_progress, human_bytes, human_count, out

_SYNTH_PRESETS = [name for name in PRESETS if name != "step3"]


def _facts(path: Path, preset: str, fp8: bool, seconds: float) -> dict:
    """What was written, read back from the files themselves (config.json and the index)."""
    from converters.hf import INDEX_FILE

    cfg = Step3Config.from_pretrained(path)
    index = json.loads((path / INDEX_FILE).read_text())
    params = cfg.num_params()
    return {"out": str(path), "preset": preset, "dtype": "fp8" if fp8 else "bf16",
            "vision": cfg.vision is not None,
            "shards": len(set(index["weight_map"].values())), "tensors": len(index["weight_map"]),
            "bytes": index["metadata"]["total_size"], "params": params["total_with_vision"],
            "seconds": round(seconds, 3)}


def synth(
    dst: Annotated[Path, typer.Argument(metavar="OUT", help="Output directory (new or empty).")],
    preset: Annotated[str, typer.Option("--preset", "-p", help=f"Model size: {', '.join(_SYNTH_PRESETS)} "
                                        "('step3' itself is far too large).")] = "step3-tiny",
    fp8: Annotated[bool, typer.Option("--fp8", help="Store linear weights as block-FP8 (E4M3 + "
                                      "weight_scale_inv), like stepfun-ai/step3-fp8.")] = False,
    vision: Annotated[bool, typer.Option("--vision", help="Add a (small) vision tower and projector.")]
    = False,
    shards: Annotated[int, typer.Option("--shards", min=1, help="Number of safetensors files.")] = 1,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same bytes.")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Finish an interrupted run into OUT, skipping "
                                         "shards whose checksum matches.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite a non-empty OUT (only files a step3 "
                                        "command wrote there are removed).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a complete HF-format Step-3 checkpoint with random weights: config.json, safetensors shards +
    index, tokenizer (byte-level BPE with Step-3's special tokens and chat template), generation_config.json.

    Examples: [bold]step3 synth ./tiny[/]

    [bold]step3 synth ./small-fp8 --preset step3-small --fp8 --shards 4[/]
    """
    if preset == "step3":
        raise Step3Error("--preset step3 is the full 321B model (~640 GB of BF16 weights): synth writes test "
                         f"checkpoints only; use one of {', '.join(_SYNTH_PRESETS)}")
    from converters.synth import synthesize

    cfg = get_preset(preset)
    start = time.perf_counter()
    with byte_progress("synthesizing") as progress:
        synthesize(dst, cfg, fp8=fp8, vision=vision, shards=shards, seed=seed, progress=progress,
                   overwrite=force, resume=resume)
    facts = _facts(dst, preset, fp8, time.perf_counter() - start)
    if json_out:
        typer.echo(json.dumps(facts, indent=2))
        return
    out.print(f"wrote {facts['out']}: {preset} {facts['dtype'].upper()}{' + vision' if vision else ''}, "
              f"{facts['shards']} shard(s), {facts['tensors']} tensors, {human_bytes(facts['bytes'])}, "
              f"{human_count(facts['params'])} parameters, seed {seed} ({facts['seconds']:.1f} s)",
              highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
