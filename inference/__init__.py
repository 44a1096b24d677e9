"""Model side of dicomnode: nnU-Net v2 segmentation on numpy volumes.

This package knows nothing about DICOM (it never imports pydicom, pynetdicom or highdicom):
it takes channels already on one voxel grid and returns a label map on that grid.
"""

from .model import SegmentationModel

__all__ = ["SegmentationModel"]
