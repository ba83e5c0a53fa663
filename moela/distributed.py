"""Several processes (``accelerate launch``, ``torchrun``): this process's place, the main process's values
on every process, and work done by the main process only."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import torch
from accelerate import PartialState

WAIT = timedelta(hours=6)  # how long a process waits for the others (e.g. for the main one's evaluation)


def process_state() -> PartialState:
    """This process's place in the run, read from the launcher's environment; it sets up the process group
    (gloo on CPU) that the Trainer then uses, with a timeout of :data:`WAIT` (the other processes of a
    comparison wait while the main one evaluates). A plain command is one process."""
    return PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shut_down(completed: bool) -> None:
    """Destroy the process group, if one was started, before the interpreter exits. Left to the interpreter's
    finalisation, gloo's threads now and then abort a process that has finished its work ("terminate called
    without an active exception", SIGABRT), and the launcher reports the run as failed. When this process
    ``completed`` its command, it first waits at a barrier for the others, so that no process tears its group
    down while another still works (the main process may still be writing its report); a process that failed
    does not wait, and the barrier of one that waits for it then fails at once (the peer closed its
    connection) and is passed over."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if completed and dist.get_world_size() > 1:
            try:
                dist.barrier()
            except RuntimeError:  # another process failed and left: its own exit status reports it
                pass
        dist.destroy_process_group()


def broadcast(value: Any) -> Any:
    """The main process's ``value`` on every process (a broadcast when several run; else ``value``)."""
    import torch.distributed as dist

    if process_group()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` run by the main process only; its result on every process, or its exception
    raised on every process (so no process waits for one that failed)."""
    outcome: tuple[Any, BaseException | None] = (None, None)
    if process_group()[0] == 0:
        try:
            outcome = (fn(*args, **kwargs), None)
        except Exception as err:
            outcome = (None, err)
    result, err = broadcast(outcome)
    if err is not None:
        raise err
    return result
