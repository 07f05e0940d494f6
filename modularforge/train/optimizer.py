"""AdamW over parameter groups, stepped by torch's fused kernel through its functional API.

`torch.optim.Optimizer.__init__` imports torch._dynamo (via `torch._disable_dynamo` on `add_param_group`),
which holds about 70 MB resident on this machine (measured: RSS of `import torch` then `import torch._dynamo`).
For the poc-50m expert phase that is 14% of its whole memory floor, paid by a process that never compiles
anything. The arithmetic here is `torch.optim.adamw.adamw(fused=True)`, the same kernel `AdamW(fused=True)`
runs; the state is kept under AdamW's names (`step`, `exp_avg`, `exp_avg_sq`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.adamw import adamw

STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


class FusedAdamW:
    def __init__(self, groups: list[tuple[list[nn.Parameter], float]], betas: tuple[float, float], eps: float = 1e-8):
        """groups: (parameters, weight decay) pairs."""
        self.groups = groups
        self.betas = betas
        self.eps = eps
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}

    def params(self) -> list[nn.Parameter]:
        return [p for params, _ in self.groups for p in params]

    def _state(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        if p not in self.state:
            # the fused kernel wants every state tensor, the step count too, on the parameter's device
            self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device), "exp_avg": torch.zeros_like(p),
                             "exp_avg_sq": torch.zeros_like(p)}
        return self.state[p]

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for params, weight_decay in self.groups:
            live = [p for p in params if p.grad is not None]
            if not live:
                continue
            states = [self._state(p) for p in live]
            adamw(live, [p.grad for p in live], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                  [], [s["step"] for s in states], fused=True, amsgrad=False, beta1=self.betas[0],
                  beta2=self.betas[1], lr=lr, weight_decay=weight_decay, eps=self.eps, maximize=False)

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    def load_state(self, p: nn.Parameter, state: dict[str, torch.Tensor]) -> None:
        """Restore one parameter's state (copied into fresh tensors of the right shapes)."""
        fresh = self._state(p)
        for key in STATE_KEYS:
            fresh[key].copy_(state[key])
