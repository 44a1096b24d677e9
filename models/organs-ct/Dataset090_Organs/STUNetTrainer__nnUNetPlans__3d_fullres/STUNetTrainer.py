"""STUNetTrainer: the custom trainer of the organs stand-in model (STU-Net / TotalSegmentator format).

Ships in the results folder next to plans.json, with the network class it builds (stunet.py);
the checkpoint names `STUNetTrainer` as its trainer and the node finds both here, without
installing them into nnunetv2's package. Like TotalSegmentator's nnUNetTrainerNoMirroring it
never mirrors (left and right kidney are different labels): no mirroring in training and
none allowed at inference. The network takes only the pooling strides from the plans; widths
and depths are the trainer's own, as STU-Net's trainers do.
"""

from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import (
    nnUNetTrainerNoMirroring,
)

from stunet import STUNet

DIMS = (8, 16, 32, 32, 32, 32)
DEPTHS = (1, 1, 1, 1, 1, 1)


class STUNetTrainer(nnUNetTrainerNoMirroring):
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        strides = configuration_manager.pool_op_kernel_sizes
        n_stages = len(strides)
        return STUNet(num_input_channels, num_output_channels, dims=DIMS[:n_stages],
                      depths=DEPTHS[:n_stages], strides=strides, deep_supervision=enable_deep_supervision)
