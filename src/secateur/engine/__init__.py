"""The engine: block by block, one block on the compute device, through one `BlockSession`."""

from secateur.engine.capture import BlockCall, capture_block_inputs, run_block
from secateur.engine.sequential import prune_model
from secateur.engine.session import BlockSession, PruneReport

__all__ = ["BlockCall", "BlockSession", "PruneReport", "capture_block_inputs", "prune_model", "run_block"]
