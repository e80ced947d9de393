"""The training processes: under torchrun, which one this is, the data read once, one rank's numbers sent to all,
and the weights checked equal at the end (a single process is rank 0 of 1 and none of this talks); and Ctrl-C or
SIGTERM, asking the run to stop."""
import os
import signal

import torch
import torch.distributed as dist

import utils


def setup_distributed():
    """(rank, world size, device): torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; otherwise one process."""
    if "RANK" not in os.environ:
        return 0, 1, utils.get_device()
    local = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def load_once(load, cfg, rank, world):
    """load(cfg) (the dataset): rank 0 first (it builds the demo set or the cache), then the other ranks."""
    if rank > 0:
        dist.barrier()
    data = load(cfg)
    if world > 1 and rank == 0:
        dist.barrier()
    return data


def from_rank0(numbers, world):
    """The tensor as rank 0 holds it, on every rank."""
    if world > 1:
        dist.broadcast(numbers, 0)
    return numbers


def check_ranks_agree(model, rank, world):
    """Every rank must hold the same weights after DDP training: say so, cheaply; then close the process group."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    gap = (flat - reference).abs().max()
    dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"weights identical on all {world} ranks" if gap.item() == 0 else
              f"warning: ranks differ by {gap.item():.2e}")
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


class StopRequest:
    """Ctrl-C or SIGTERM: the first asks the run to stop after the current step (it then saves and exits with
    code 130); a second interrupts at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, _signum, _frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
