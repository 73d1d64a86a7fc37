"""Distributed training on torch.distributed: layouts and meshes (mesh.py), expert parallelism
and global balancing (ep.py), FSDP2 (fsdp.py) and sharded checkpoints (checkpoint.py).

Nothing here is imported by the single-process path."""
