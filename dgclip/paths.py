"""Where dgclip keeps weights and caches (shared by backbone.py and tiny_clip.py)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir"]


def default_cache_dir() -> Path:
    """Where weights and caches live: $DGCLIP_CACHE, else ~/.cache/dgclip."""
    env = os.environ.get("DGCLIP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dgclip"
