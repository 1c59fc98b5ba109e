"""The role of a prunable linear in its block, as far as its input goes.

Adapters say which role each layer has (`Adapter.layer_role`); methods may treat the two
differently (STADE's `layers=out`) without ever seeing a layer name. Neither side imports the
other: both import these names from here.

- "normed": reads a normalisation of the residual stream (q/k/v, gate/up, fc1, c_attn, ...).
- "out": reads an inner activation (attention output, FFN activation), whose channels can have
  large means, and writes into the residual stream (o_proj, down_proj, out_proj, fc2, c_proj, ...).
"""

ROLE_NORMED = "normed"
ROLE_OUT = "out"
