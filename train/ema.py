"""An exponential moving average of the weights (`train.ema`).

After every optimizer step each floating-point tensor of the state (parameters and buffers) moves
towards the model's: shadow <- d * shadow + (1 - d) * weights, with the decay always warmed up as
d = min(decay, (1 + n) / (10 + n)) after n updates (the schedule of TensorFlow's
ExponentialMovingAverage with num_updates), so early averages are not dominated by the start.
(timm's ModelEmaV3 warms up only when asked, by another formula.) The shadow lives on the model's
device, in fp32; `applied` swaps it into the model for evaluation (or a checkpoint) and swaps the
trained weights back.
"""
from __future__ import annotations

import contextlib

import torch


class ModelEma:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema={decay}: the decay must be in (0, 1), e.g. 0.999")
        self.decay, self.updates = decay, 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()
                       if v.dtype.is_floating_point}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        self.updates += 1
        live = [state[k].float() for k in self.shadow]
        torch._foreach_lerp_(list(self.shadow.values()), live, 1.0 - self.current_decay())

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module):
        """The model holds the averaged weights inside the block, its own again after it."""
        state = model.state_dict()
        kept = {k: state[k].detach().clone() for k in self.shadow}
        with torch.no_grad():
            for k, v in self.shadow.items():
                state[k].copy_(v)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in kept.items():
                    state[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = self.shadow.keys() - state["shadow"].keys()
        if missing:
            raise KeyError(f"the EMA state lacks {sorted(missing)[0]}")
        self.updates = int(state["updates"])
        for k, v in self.shadow.items():
            v.copy_(state["shadow"][k])
