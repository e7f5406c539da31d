"""An input embedding with new rows for added tokens: the only weights textual inversion trains.

Why not resize the text encoder's embedding and mask its gradient (diffusers' example): the
optimizer would then hold state for the whole vocabulary (49,408 rows), weight decay would move
the old rows unless they are copied back after every step, and `sdkit plan` would count the
whole matrix as trainable. Here the old rows live in the frozen original module, untouched.
"""

from __future__ import annotations

import torch
from torch import nn


class AddedTokenEmbedding(nn.Module):
    """`base` (frozen) for every id, except `token_ids`, which read the trainable `added` rows."""

    def __init__(self, base: nn.Embedding, token_ids: list[int], initial: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=initial.device),
                             persistent=False)
        self.added = nn.Parameter(initial.detach().clone())

    @property
    def weight(self) -> torch.Tensor:  # what transformers' code reads of an input embedding (dtype, device)
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids.clamp(max=self.base.num_embeddings - 1))  # new ids may lie past the old rows
        for k in range(self.added.shape[0]):
            is_new = (ids == self.token_ids[k]).unsqueeze(-1)
            out = torch.where(is_new, self.added[k].to(out.dtype), out)
        return out
