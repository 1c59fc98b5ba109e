"""The sequential engine: block by block, one block on the compute device."""

from secateur.engine.capture import BlockCall, capture_block_inputs, run_block
from secateur.engine.sequential import PruneReport, prune_model

__all__ = ["BlockCall", "PruneReport", "capture_block_inputs", "prune_model", "run_block"]
