"""LM head + cross-entropy in one pass over row slices, with the gradients computed in the forward pass.

Autograd's own `cross_entropy(lm_head(h).float())` keeps, per slice, the low-precision logits, their fp32 copy,
the log-softmax and then its gradient: several vocabulary-wide buffers at once, which is most of what training
holds above its weights and activations at large vocabularies. Here each slice's logits buffer (in the head's
dtype) is turned into the gradient of the loss with respect to the logits in place, a few fp32 rows at a time,
used at once for the gradients of the hidden states and of the head's weight, and dropped. Nothing vocabulary-wide lives past
its slice and the head is never recomputed in backward.
"""

from __future__ import annotations

import torch
from torch import nn

BLOCK_BYTES = 4 << 20  # fp32 rows of logits handled at once inside a slice


def _slices(rows: int, chunks: int) -> list[slice]:
    step = -(-rows // chunks)
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunks, dtype, grad_hidden_needed, grad_weight_needed, reference=None,
                distill=0.0):
        w = weight.to(dtype)
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight_needed else None
        block = max(1, BLOCK_BYTES // (4 * weight.shape[0]))
        for rows in _slices(hidden.shape[0], chunks):
            h = hidden[rows].to(dtype)
            logits = h @ w.t()  # the slice's only vocabulary-wide buffer: logits, then their gradient in place
            for start in range(0, logits.shape[0], block):
                part, t = logits[start : start + block], targets[rows][start : start + block]
                exact = part.float()  # fp32 rows, so the log-sum-exp is exact whatever the head's dtype
                lse = torch.logsumexp(exact, dim=-1)
                total += (lse - exact.gather(1, t[:, None]).squeeze(1)).sum()
                if reference is not None:  # + distill x KL(reference || model), the reference under the same head
                    ref = (reference[rows][start : start + block].to(dtype) @ w.t()).float().log_softmax(-1)
                    log_model = exact - lse[:, None]
                    total += distill * (ref.exp() * (ref - log_model)).sum()
                if grad_hidden is not None or grad_weight is not None:
                    exact.sub_(lse[:, None]).exp_()  # d(NLL)/d(logits) = softmax - one_hot
                    if reference is not None:  # d(KL)/d(logits) = softmax - reference probabilities
                        exact.mul_(1 + distill).sub_(ref.exp_().mul_(distill))
                    exact[torch.arange(len(t), device=t.device), t] -= 1
                    if exact.data_ptr() != part.data_ptr():
                        part.copy_(exact)
                del exact
            if grad_hidden is not None:
                grad_hidden[rows] = logits @ w
            if grad_weight is not None:  # accumulated in fp32 across slices
                grad_weight += logits.t() @ h
            del logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunks: int = 1,
                         reference: torch.Tensor | None = None, distill: float = 0.0) -> torch.Tensor:
    """Summed next-token NLL (fp32) of `head(hidden)` against `targets`; hidden (N, H), targets (N,). With
    `reference` (N, H), hidden states of another model under the same head, plus `distill` x the summed KL
    divergence of this model's predictions from that model's (no gradient flows into `reference`).
    The head runs in the autocast dtype when autocast is on, as `head(hidden)` would."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    grads = torch.is_grad_enabled()
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, head.weight, targets, chunks, dtype,
                                         grads and hidden.requires_grad, grads and head.weight.requires_grad,
                                         None if reference is None else reference.detach(), float(distill))
