"""sere.vllm.tiles: SERE's fused-MoE tile files, and when the plugin points vLLM at them."""
import json

import pytest

from sere.config import SereConfig
from sere.vllm import tiles


def _write(folder, name="E=60,N=1408,device_name=NVIDIA_H200.json"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps({"16": {"BLOCK_SIZE_M": 16}}))
    return folder


def test_selects_the_folder_when_the_user_set_none(tmp_path):
    env = {}
    folder = _write(tmp_path / "tiles")
    assert tiles.select_sere_tiles(folder, env) == str(folder)
    assert env[tiles.ENV] == str(folder)


def test_the_users_folder_wins(tmp_path):
    env = {tiles.ENV: "/my/tiles"}
    assert tiles.select_sere_tiles(_write(tmp_path / "tiles"), env) is None
    assert env[tiles.ENV] == "/my/tiles"


def test_no_files_changes_nothing(tmp_path):
    env = {}
    (tmp_path / "empty").mkdir()
    assert tiles.select_sere_tiles(tmp_path / "empty", env) is None
    assert env == {}


def test_shipped_files_are_vllm_config_files():
    """Every shipped file is named as vLLM names its tuned configs and maps token counts to complete tiles."""
    for name in tiles.shipped_files():
        assert name.startswith("E=") and ",N=" in name and ",device_name=" in name, name
        content = json.loads((tiles.TILES_DIR / name).read_text())
        assert content, name
        for m, cfg in content.items():
            assert int(m) >= 1
            assert {"BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "num_warps", "num_stages"} <= set(cfg), (name, m)


def test_config_field():
    assert SereConfig().moe_tiles == "sere"
    assert SereConfig.from_dict({"moe_tiles": "vllm"}).moe_tiles == "vllm"
    with pytest.raises(ValueError, match="moe_tiles must be one of 'sere', 'vllm'"):
        SereConfig(moe_tiles="fast")
