"""The floor of any torchrun job here: import what a reshard rank imports, join a gloo group."""
import torch  # noqa: F401
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401
import hydra  # noqa: F401
import safetensors  # noqa: F401

dist.init_process_group("gloo")
dist.barrier()
dist.destroy_process_group()
