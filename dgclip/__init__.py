"""dgclip: CLIP-based domain generalization methods on open_clip, with dgkernels on the hot paths."""

__version__ = "0.2.0"
