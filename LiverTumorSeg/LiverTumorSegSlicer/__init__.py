"""The Slicer side of LiverTumorSeg (MRML, no Qt): what the scripted module's Logic is built from.

Kept apart from the core (``LiverTumorSegLib``, which never imports Slicer) and out of the module
folder's top level (where Slicer would take every .py file for a module).
"""
