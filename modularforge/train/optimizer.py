"""The optimizers of the training loop, stepped through torch's functional API: AdamW (torch's fused kernel) and
Adafactor (torch's, factored second moments, no first moment) for runs bound by memory.

`torch.optim.Optimizer.__init__` imports torch._dynamo (via `torch._disable_dynamo` on `add_param_group`),
which holds about 70 MB resident on this machine (measured: RSS of `import torch` then `import torch._dynamo`).
For the poc-50m expert phase that is 14% of its whole memory floor, paid by a process that never compiles
anything. So the state is kept here, under torch's names (AdamW: `step`, `exp_avg`, `exp_avg_sq`; Adafactor:
`step`, `row_var`, `col_var`, `variance`), and each step calls the function torch's class calls.

Both can step one parameter at a time (`step_one`), which the loop uses to step inside backward: each parameter is
updated as soon as its gradient is complete and the gradient is dropped, so the gradients of the whole model never
exist together (the `optimizer step in backward` of torch's tutorials).

Memory per trained parameter: AdamW 4 bytes of gradient + 8 of state; Adafactor 4 bytes of gradient + a row and a
column per matrix. Adafactor's step size here is absolute (its relative step, which scales updates by each matrix's
RMS, is turned off by `eps2` = 1), so a learning rate means what it means for AdamW.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim._adafactor import adafactor
from torch.optim.adamw import adamw


class Optimizer:
    """Parameter groups of (parameters, weight decay), the state of each parameter, and steps at a given rate."""

    def __init__(self, groups: list[tuple[list[nn.Parameter], float]]):
        self.groups = groups
        self.state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
        self.decay = {p: weight_decay for params, weight_decay in groups for p in params}

    def params(self) -> list[nn.Parameter]:
        return [p for params, _ in self.groups for p in params]

    def _state(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _apply(self, params: list[nn.Parameter], weight_decay: float, lr: float) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, lr: float) -> None:
        for params, weight_decay in self.groups:
            live = [p for p in params if p.grad is not None]
            if live:
                self._apply(live, weight_decay, lr)

    @torch.no_grad()
    def step_one(self, p: nn.Parameter, lr: float) -> None:
        """Update `p` from its gradient, then drop the gradient."""
        self._apply([p], self.decay[p], lr)
        p.grad = None

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    def load_state(self, p: nn.Parameter, state: dict[str, torch.Tensor]) -> None:
        """Restore one parameter's state (copied into fresh tensors of the right shapes)."""
        fresh = self._state(p)
        for key, value in fresh.items():
            value.copy_(state[key])


class FusedAdamW(Optimizer):
    def __init__(self, groups: list[tuple[list[nn.Parameter], float]], betas: tuple[float, float], eps: float = 1e-8):
        super().__init__(groups)
        self.betas, self.eps = betas, eps

    def _state(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        if p not in self.state:
            # the fused kernel wants every state tensor, the step count too, on the parameter's device
            self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device), "exp_avg": torch.zeros_like(p),
                             "exp_avg_sq": torch.zeros_like(p)}
        return self.state[p]

    def _apply(self, params: list[nn.Parameter], weight_decay: float, lr: float) -> None:
        states = [self._state(p) for p in params]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=True, amsgrad=False, beta1=self.betas[0],
              beta2=self.betas[1], lr=lr, weight_decay=weight_decay, eps=self.eps, maximize=False)


class Adafactor(Optimizer):
    """Adafactor (Shazeer & Stern, 2018) as torch implements it: second moments factored into a row and a column per
    matrix, no first moment, decay 1 - t^-0.8, updates clipped to RMS 1; absolute step size (see the module)."""

    def _state(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        if p not in self.state:
            state = {"step": torch.zeros((), dtype=torch.float32)}
            if p.dim() > 1:
                state["row_var"] = p.new_zeros((*p.shape[:-1], 1))
                state["col_var"] = p.new_zeros((*p.shape[:-2], 1, p.shape[-1]))
            else:
                state["variance"] = torch.zeros_like(p)
            self.state[p] = state
        return self.state[p]

    def _apply(self, params: list[nn.Parameter], weight_decay: float, lr: float) -> None:
        states = [self._state(p) for p in params]
        adafactor(params, [p.grad for p in params], [s.get("row_var") for s in states],
                  [s.get("col_var") for s in states], [s.get("variance") for s in states],
                  [s["step"] for s in states], foreach=False, d=1.0, lr=lr, beta2_decay=-0.8,
                  weight_decay=weight_decay, eps1=None, eps2=1.0, maximize=False)
