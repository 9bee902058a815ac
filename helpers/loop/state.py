"""The training state: the model and what trains it, as one object the loop steps and a
checkpoint saves and restores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # names for annotations only: importing costs nothing at run time
    import torch
    from torch.optim.lr_scheduler import LRScheduler


@dataclass
class TrainState:
    """``model`` (as the ranks train it: wrapped in DDP, or sharded by FSDP), its loss,
    optimizer, per-step learning rate schedule and, for fp16, gradient scaler."""

    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: torch.amp.GradScaler | None = None

    @property
    def module(self) -> torch.nn.Module:
        """The bare model, without the DDP wrapper: what a checkpoint keeps, what inference
        rebuilds."""
        return getattr(self.model, "module", self.model)

    def state_dict(self, sharded: bool = False) -> dict:
        """What a checkpoint keeps of the training state: all of it, or with ``sharded`` (FSDP)
        the schedule only, the model and optimizer going in :meth:`sharded_state_dict`."""
        schedule = {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        if sharded:
            return schedule
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **schedule,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` kept (every rank loads the same: all stay in step)."""
        if "model" in state:
            self.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def sharded_state_dict(self) -> dict:
        """This rank's shards of the model and the optimizer's state, keyed by parameter name
        (``torch.distributed.checkpoint``'s form, for FSDP; resharded first:
        :func:`helpers.loop.parallel.resharded`)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optimizer}

    def load_sharded_state_dict(self, state: dict) -> None:
        """Restore what :meth:`sharded_state_dict` gave, filled in by a load."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
