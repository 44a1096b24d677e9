"""nnUNetTrainer_DGST: the custom trainer of the lymph-node stand-in model (LN-Seg-FM's format).

This file ships with the model folder, as a custom nnU-Net trainer does: the checkpoints name
`nnUNetTrainer_DGST` as their trainer, and the node finds the class here, next to
dataset.json, without copying anything into nnunetv2's package.

The stand-in differs from nnUNetTrainer in training only: half the patches are centred on a
node (small targets). The network is the one the plans describe, built by the inherited
`build_network_architecture`.
"""

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_DGST(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.oversample_foreground_percent = 0.5
