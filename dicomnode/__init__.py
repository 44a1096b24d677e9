"""dicomnode: a DICOM node that runs nnU-Net segmentation models on studies sent by a PACS.

Data flow: receiver -> spool -> index -> assembler -> queue -> worker -> volumes/suv ->
inference -> seg -> sender. This package is the DICOM side; it never imports torch at
module level (the `inference` package holds the model side).
"""

__version__ = "0.1.0"
