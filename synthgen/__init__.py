"""synthgen: differentially private model transcription (DPSD).

Heavy modules (torch, diffusers) are imported by the submodules that need them, so that
``import synthgen`` and ``synthgen --help`` stay fast.
"""

__version__ = "0.1.0"
