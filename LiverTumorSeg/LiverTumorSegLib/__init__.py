"""LiverTumorSeg core: two-stage G-UNETR++ liver and liver-tumor segmentation on CT.

Qt-free and Slicer-free: the Slicer module and the ``livertumorseg`` command both call it.
"""

__version__ = "0.1.0"
