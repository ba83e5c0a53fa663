"""``python -m tests.sharded_cpu ARGS``: the ``moela`` command, with accelerate's FSDP2 or DeepSpeed kept on CPU
processes (gloo).

accelerate 1.15 turns ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` (set by ``accelerate launch`` from
an FSDP or DeepSpeed config) into ``DistributedType.FSDP`` / ``DEEPSPEED`` only on accelerator devices
(``AcceleratorState.__init__``); CPU processes stay ``MULTI_CPU`` and the Trainer trains them as plain DDP.
This shim changes that one decision, so everything after it is accelerate's, torch's and DeepSpeed's real code
(``fully_shard`` on a CPU device mesh; DeepSpeed with ``DS_ACCELERATOR=cpu``). With ``$MOELA_FSDP_LOG`` set,
each process appends the class of every module it passes to ``fully_shard`` to ``$MOELA_FSDP_LOG.<rank>``."""

from __future__ import annotations

import os
import sys

import torch.distributed.fsdp
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from moela.cli import main

_init = AcceleratorState.__init__
_fully_shard = torch.distributed.fsdp.fully_shard


def init(self, *args, cpu=False, fsdp_plugin=None, **kwargs):
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    _init(self, *args, cpu=cpu and not deepspeed, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


def fully_shard(module, *args, **kwargs):
    if os.environ.get("MOELA_FSDP_LOG"):
        with open(f"{os.environ['MOELA_FSDP_LOG']}.{os.environ['RANK']}", "a") as log:
            log.write(type(module).__name__ + "\n")
    return _fully_shard(module, *args, **kwargs)


AcceleratorState.__init__ = init
torch.distributed.fsdp.fully_shard = fully_shard  # accelerate imports it from here when it prepares the model

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
