"""napari-feddp: segment H&E whole-slide images with a federated, differentially private model.

The core (``slides``, ``models``, ``inference``, ``training``, ``federation``) is plain
Python without Qt; ``widgets`` and ``cli`` are thin layers over it.
"""

__version__ = "0.1.0"
