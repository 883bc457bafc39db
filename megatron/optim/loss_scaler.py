"""fp16 loss scaling: Megatron's DynamicGradScaler (hysteresis, growth window) and a constant scaler."""
from __future__ import annotations


class ConstantLossScaler:
    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])


class DynamicLossScaler:
    def __init__(self, initial_scale: float = 2.0**32, min_scale: float = 1.0, growth_interval: int = 1000,
                 hysteresis: int = 2, growth_factor: float = 2.0, backoff_factor: float = 0.5):
        self.scale = float(initial_scale)
        self.min_scale, self.growth_interval, self.hysteresis = float(min_scale), growth_interval, hysteresis
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale *= self.growth_factor

    def state_dict(self) -> dict:
        return {"scale": self.scale, "growth_tracker": self.growth_tracker, "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, sd: dict) -> None:
        self.scale = float(sd["scale"])
        self.growth_tracker = int(sd.get("growth_tracker", 0))
        self.hysteresis_tracker = int(sd.get("hysteresis_tracker", self.hysteresis))


def build_loss_scaler(precision_cfg):
    if not precision_cfg.fp16:
        return ConstantLossScaler(1.0)
    if precision_cfg.loss_scale is not None:
        return ConstantLossScaler(precision_cfg.loss_scale)
    return DynamicLossScaler(precision_cfg.initial_loss_scale, precision_cfg.min_loss_scale,
                             precision_cfg.loss_scale_window, precision_cfg.hysteresis)
