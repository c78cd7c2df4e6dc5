"""Property: however a checkpoint is corrupted, HFCheckpoint + validate() + get() raise only Step3Errors.

Random damage to valid tiny checkpoints (truncated shards, flipped header bytes, edited index JSON,
bad config values); anything but a Step3Error (a raw safetensors/json/OS/torch exception) or a
hang fails the test. A checkpoint that happens to survive the damage must read back completely.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from contextlib import suppress
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters.errors import Step3Error
from converters.hf import INDEX_FILE, HFCheckpoint

FUZZ = settings(max_examples=50, deadline=timedelta(seconds=10), derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def exercise(ckpt: Path, data: st.DataObject) -> None:
    """Open, validate, read every tensor raw and a few dequantized; only Step3Error may escape."""
    try:
        with HFCheckpoint(ckpt) as c:
            with suppress(Step3Error):
                c.validate()
            for name in c.names():
                with suppress(Step3Error):
                    c.get(name)
            if c.names():  # dequantization is the slow part on a CPU: a few names suffice
                for name in data.draw(st.lists(st.sampled_from(c.names()), max_size=3)):
                    with suppress(Step3Error):
                        assert c.get_weight(name, dtype=torch.float32).dtype == torch.float32
            c.total_bytes()
    except Step3Error as e:
        assert str(e)  # a message for the user, never empty


def damaged_copy(src: Path, damage, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(shutil.copytree(src, Path(tmp) / "ckpt"))
        damage(ckpt)
        exercise(ckpt, data)


def _shards(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


@FUZZ
@given(data=st.data())
def test_truncated_shards(tiny_fp8_ckpt, data):
    def damage(ckpt: Path) -> None:
        shard = data.draw(st.sampled_from(_shards(ckpt)))
        raw = shard.read_bytes()
        shard.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])

    damaged_copy(tiny_fp8_ckpt, damage, data)


@FUZZ
@given(data=st.data())
def test_flipped_header_bytes(tiny_fp8_ckpt, data):
    def damage(ckpt: Path) -> None:
        shard = data.draw(st.sampled_from(_shards(ckpt)))
        raw = bytearray(shard.read_bytes())
        end = 8 + struct.unpack("<Q", raw[:8])[0]
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, end - 1))
            raw[at] ^= data.draw(st.integers(1, 255))
        shard.write_bytes(bytes(raw))

    damaged_copy(tiny_fp8_ckpt, damage, data)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(data=st.data())
def test_edited_index(tiny_fp8_ckpt, data):
    def damage(ckpt: Path) -> None:
        index = ckpt / INDEX_FILE
        d = json.loads(index.read_text())
        wmap = d["weight_map"]
        how = data.draw(st.sampled_from(["value", "drop", "add", "rename", "truncate", "replace"]))
        name = data.draw(st.sampled_from(sorted(wmap)))
        if how == "value":
            wmap[name] = data.draw(JSON_VALUES | st.sampled_from(["", ".", "..", "/etc/passwd",
                                                                  "../ckpt/" + wmap[name], "config.json"]))
        elif how == "drop":
            del wmap[name]
        elif how == "add":
            wmap[data.draw(st.text(max_size=40))] = data.draw(st.sampled_from(sorted(set(wmap.values()))))
        elif how == "rename":
            wmap[name + data.draw(st.text(min_size=1, max_size=5))] = wmap.pop(name)
        elif how == "replace":
            d = data.draw(JSON_VALUES)
        text = json.dumps(d)
        if how == "truncate":
            text = text[: data.draw(st.integers(0, len(text) - 1))]
        index.write_text(text)

    damaged_copy(tiny_fp8_ckpt, damage, data)


CONFIG_FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_attention_groups",
                 "head_dim", "share_q_dim", "intermediate_size", "moe_layers_enum", "moe_num_experts",
                 "moe_top_k", "moe_intermediate_size", "share_expert_dim", "vocab_size", "rope_theta",
                 "max_position_embedding", "rms_norm_eps"]
VISION_FIELDS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                 "image_size", "num_channels", "output_hidden_size"]
CONFIG_VALUES = JSON_VALUES | st.integers(-3, 10**9) | st.sampled_from(["2,3", "3,2", "0,5", "", "1,1", "9"])


@FUZZ
@given(data=st.data())
def test_bad_config_values(tiny_vision_ckpt, data):
    def damage(ckpt: Path) -> None:
        file = ckpt / "config.json"
        d = json.loads(file.read_text())
        where = data.draw(st.sampled_from(["text_config", "vision_config", "top", "bytes"]))
        if where == "bytes":
            raw = bytearray(file.read_bytes())
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
            file.write_bytes(bytes(raw))
            return
        if where == "top":
            key = data.draw(st.sampled_from(["text_config", "vision_config", "projector_bias"]))
            d[key] = data.draw(JSON_VALUES)
        else:
            fields = CONFIG_FIELDS if where == "text_config" else VISION_FIELDS
            d[where][data.draw(st.sampled_from(fields))] = data.draw(CONFIG_VALUES)
        file.write_text(json.dumps(d))

    damaged_copy(tiny_vision_ckpt, damage, data)


@pytest.mark.parametrize("which", ["tiny_ckpt", "tiny_fp8_ckpt", "tiny_vision_ckpt"])
def test_undamaged_checkpoints_read_completely(request, which):
    """The harness itself: on a valid checkpoint nothing raises, so the fuzz tests do exercise reads."""
    with HFCheckpoint(request.getfixturevalue(which)) as c:
        c.validate()
        assert all(c.get(n).numel() > 0 for n in c.names())
        fp8 = [n for n in c.names() if c.info(n).dtype == "F8_E4M3"][:2]
        assert all(c.get_weight(n).isfinite().all() for n in fp8 + c.names()[:2])
