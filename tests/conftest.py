"""Shared fixtures: synthetic step3-tiny checkpoints, built once per test session.

The session checkpoints are shared by every test that asks for them: treat them as READ-ONLY.
A test that changes files (corrupts a shard, edits config.json, deletes the index) must work on a
copy: `shutil.copytree(tiny_ckpt, tmp_path / "ckpt")`, or build its own with `make_ckpt`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from converters.config import PRESETS, Step3Config
from converters.synth import synthesize

TINY = PRESETS["step3-tiny"]


@pytest.fixture(scope="session")
def tiny_cfg() -> Step3Config:
    """The step3-tiny preset (the written config.json may differ in token ids; read it back instead)."""
    return TINY


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """step3-tiny, BF16, one shard, seed 0, no vision. Read-only: copy it before changing anything."""
    return synthesize(tmp_path_factory.mktemp("tiny_bf16"), TINY)


@pytest.fixture(scope="session")
def tiny_fp8_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """step3-tiny, block-FP8 (E4M3 + weight_scale_inv), two shards, seed 0: the FP8 twin of tiny_ckpt.

    Read-only: copy it before changing anything.
    """
    return synthesize(tmp_path_factory.mktemp("tiny_fp8"), TINY, fp8=True, shards=2)


@pytest.fixture(scope="session")
def tiny_vision_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """step3-tiny with the TINY_VISION tower, BF16, one shard, seed 0. Read-only: copy it first."""
    return synthesize(tmp_path_factory.mktemp("tiny_vision"), TINY, vision=True)


@pytest.fixture
def make_ckpt(tmp_path: Path) -> Callable[..., Path]:
    """A factory for a private checkpoint: `make_ckpt(fp8=True, shards=3, seed=1, cfg=..., name=...)`.

    Each call writes a fresh directory under this test's tmp_path (default cfg: step3-tiny), so the
    test may change it freely.
    """
    count = 0

    def make(cfg: Step3Config = TINY, name: str | None = None, **kw) -> Path:
        nonlocal count
        count += 1
        return synthesize(tmp_path / (name or f"ckpt{count}"), cfg, **kw)

    return make
