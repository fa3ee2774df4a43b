"""Model and optimizer as one Stateful, in the sharding-independent form DCP reshards on load."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict, set_state_dict
from torch.optim import Optimizer


class ModelOptimizerState:
    """State of the model weights and the optimizer's per-parameter tensors, keyed by parameter name.

    Only the optimizer's tensors are saved: its hyper-parameters come from the config and the
    schedule, so a resumed run may change them deliberately, and nothing non-tensor needs pickling.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        """{"model": weights, "optim": optimizer tensors}, full names, DTensor shards under FSDP."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state["state"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load weights and optimizer tensors, keeping the current hyper-parameters."""
        param_groups = get_optimizer_state_dict(self.model, self.optimizer)["param_groups"]
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict={"state": state["optim"], "param_groups": param_groups},
        )
