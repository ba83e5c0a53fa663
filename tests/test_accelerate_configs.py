"""The shipped accelerate configs parse; the FSDP one builds accelerate's FSDP2 plugin. (They run in
test_distributed on CPU processes: DDP and FSDP2 always, DeepSpeed when its package is installed.)"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_multi_gpu_env

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
KINDS = {"ddp.yaml": DistributedType.MULTI_GPU, "fsdp.yaml": DistributedType.FSDP,
         "deepspeed-zero2.yaml": DistributedType.DEEPSPEED, "deepspeed-zero3.yaml": DistributedType.DEEPSPEED}


@pytest.mark.parametrize("name", sorted(KINDS))
def test_config_parses_and_says_how_to_launch(name):
    path = CONFIGS / name
    assert path.read_text().startswith("#") and "accelerate launch --config_file" in path.read_text()
    config = load_config_from_file(str(path))
    assert config.distributed_type == KINDS[name]
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(name[-6])
    if name == "deepspeed-zero3.yaml":  # moela injects into the loaded model, then DeepSpeed partitions it
        assert config.deepspeed_config["zero3_init_flag"] is False
        assert config.deepspeed_config["zero3_save_16bit_model"] is True


def test_fsdp_config_is_fsdp2_with_a_full_state_dict():
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "train.py"])
    args, _, _ = _validate_launch_command(args)
    with mock.patch.dict(os.environ, prepare_multi_gpu_env(args)):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type) and not plugin.cpu_ram_efficient_loading
