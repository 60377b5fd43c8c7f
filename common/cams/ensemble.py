"""One CNN as the models that speak for it: a single-split run's one model, or the K fold models of a K-fold run
as a bagged ensemble (each image's probabilities and raw maps averaged over the members).

    ensemble = CnnEnsemble("resnet50", (model_fold_1, ..., model_fold_k), image_size=224, device=device)
    maps, p_malignant, logits = ensemble.maps_and_probabilities(batch, target="predicted", methods=("gradcam",))
    ensemble.probabilities(batch)        # (B, 2) mean softmax, for perturbation methods and faithfulness
    ensemble.as_module()                 # an nn.Module whose softmax is that mean (captum takes modules)

Each member runs ONE pass per batch (cams_and_logits: every requested map and the logits together) and explains
the class its own logits give by the rule (the rule the maps of the run were made with), so a one-member ensemble
is exactly its model.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.cams.methods import cams_and_logits


class MeanProbabilityModule(nn.Module):
    """The members as one module: log of the mean of their softmax probabilities, so that softmax of its output is
    the bagged probability (a one-member module is the member itself, see CnnEnsemble.as_module)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probabilities = torch.stack([torch.softmax(member(images).float(), dim=1) for member in self.members])
        return torch.log(probabilities.mean(dim=0).clamp_min(1e-12))


# A member loaded only while it runs: a function that returns the model, in eval mode, on the ensemble's device.
MemberLoader = Callable[[], nn.Module]


@dataclass(frozen=True, repr=False)
class CnnEnsemble:
    arch: str
    # One per fold (a single split: one): a model in eval mode on one device, or a MemberLoader. Loaders keep memory
    # to one fold model at a time (predict.py on a K-fold run: 3 folds of VGG-16 alone are 1.5 GB), at the cost
    # of loading each member anew for each batch (memory-mapped: tenths of a second on a CPU).
    members: tuple[nn.Module | MemberLoader, ...]
    image_size: int  # every member's input size (the run's checkpoints record it)
    device: torch.device  # where every member runs (a loader's member is loaded there)

    def __repr__(self) -> str:  # the models would fill a screen
        return f"CnnEnsemble({self.arch!r}, {len(self.members)} member(s), {self.image_size} px)"

    def member(self, index: int) -> nn.Module:
        """Member `index` as a model (a loader's member loaded now; the caller drops it when done)."""
        member = self.members[index]
        return member if isinstance(member, nn.Module) else member()

    def maps_and_probabilities(self, batch: torch.Tensor, *, target: str | torch.Tensor, methods: tuple[str, ...]
                               ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """For a normalised batch (B, 3, S, S): {method: (B, h, w) raw maps, the members' mean}, P(malignant)
        (B,) the members' mean probability, and the members' mean logits (B, 2). `target`: a rule each member
        applies to its own logits, or (B,) class indices every member explains."""
        maps = {method: [] for method in methods}
        probabilities, logits = [], []
        for index in range(len(self.members)):
            member = self.member(index)
            member_maps, member_logits = cams_and_logits(member, self.arch, batch, target=target, methods=methods)
            del member  # a loaded member goes before the next one loads
            for method in methods:
                maps[method].append(member_maps[method].cpu().numpy())
            logits.append(member_logits.cpu().numpy())
            probabilities.append(torch.softmax(member_logits, dim=1)[:, 1].cpu().numpy())
        return ({method: np.mean(values, axis=0) for method, values in maps.items()}, np.mean(probabilities, axis=0),
                np.mean(logits, axis=0))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2) the members' mean softmax probabilities (no autograd)."""
        with torch.no_grad():
            return torch.softmax(self.as_module()(images).float(), dim=1)

    def as_module(self) -> nn.Module:
        """The ensemble as one module for captum and the faithfulness metric: the member itself when there is one
        (its logits), else MeanProbabilityModule (log of the mean probability)."""
        members = [self.member(index) for index in range(len(self.members))]  # captum calls it many times: all loaded
        module = members[0] if len(members) == 1 else MeanProbabilityModule(members)
        return module.eval()
