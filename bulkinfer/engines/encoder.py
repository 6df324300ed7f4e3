"""One forward pass per batch, no generation: pooled hidden states (embed) or classifier logits
(classify), for encoder (BERT-like) and decoder models alike.

Rows are right-padded with an attention mask, so every row's real tokens sit at positions
0..n-1 whatever batch it lands in: a row's result does not depend on its neighbours, and its
last real token is at n-1 (what last-token pooling and decoder classifiers read).
"""

from __future__ import annotations

import numpy as np
import torch

from bulkinfer.engines.base import EngineLimits


class EncoderEngine:
    """A model without a decode loop, on one device; results come back as float32 numpy."""

    def __init__(self, model, pad_id: int, limits: EngineLimits):
        self.limits = limits
        self.model = model
        self.pad_id = pad_id
        self.device = next(model.parameters()).device  # (an encoder stack has no .device)
        self.counters: dict[str, float] = {}

    @torch.inference_mode()
    def embed(self, sequences: list[np.ndarray], pooling: str, normalize: bool) -> np.ndarray:
        """One vector per sequence: mean over real tokens, the first token, or the last one."""
        input_ids, mask = right_padded(sequences, self.pad_id, self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return pool_padded(hidden, mask, pooling, normalize)

    @torch.inference_mode()
    def classify(self, sequences: list[np.ndarray]) -> np.ndarray:
        """Logits [rows, labels]. Decoder classifiers (a `score` head read at the last token)
        are read at each row's last real token here, rather than where transformers guesses it
        from pad ids (wrong when the pad id is also a real token, such as EOS)."""
        input_ids, mask = right_padded(sequences, self.pad_id, self.device)
        head = getattr(self.model, "score", None)
        if isinstance(head, torch.nn.Linear):
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask)
            rows = torch.arange(len(sequences), device=self.device)
            logits = head(hidden.last_hidden_state[rows, mask.sum(1) - 1])
        else:
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        return logits.float().cpu().numpy()


def right_padded(sequences: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Token ids [rows, longest] padded on the right with `pad_id`, and the attention mask."""
    longest = max(len(s) for s in sequences)
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), longest), dtype=np.int64)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def pool_padded(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, normalize: bool):
    """Float32 numpy [rows, dim] from right-padded hidden states [rows, longest, dim]: mean over
    real tokens, the first token (cls) or each row's last real token."""
    hidden = hidden.float()
    if pooling == "mean":
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        pooled = hidden[torch.arange(len(hidden), device=hidden.device), mask.sum(1) - 1]
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
    return pooled.cpu().numpy()
