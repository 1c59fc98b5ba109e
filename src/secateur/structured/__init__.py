"""Structured pruning support: checkpoints of models whose blocks were physically sliced.

The slicing itself is architecture knowledge and lives in the adapters
(`Adapter.ffn_units`, `head_units`, `keep_ffn`, `keep_head_groups`, `remove_blocks`,
`block_shapes`, `count_block_params`).
"""

from secateur.structured._rebuild import stock_widths_read_quietly
from secateur.structured.checkpoint import (
    finalize_config,
    is_recorded,
    load_structured_checkpoint,
    prepare_checkpoint,
    save_structured,
    write_extra_files,
    write_modeling_file,
)

__all__ = [
    "finalize_config",
    "is_recorded",
    "load_structured_checkpoint",
    "prepare_checkpoint",
    "save_structured",
    "stock_widths_read_quietly",
    "write_extra_files",
    "write_modeling_file",
]
