"""Dataset downloads: `dgclip download NAME --root DIR` (see install.py for the order of work)."""
from .remote import DownloadError, fetch
from .install import MANIFEST, check_dataset, download
from .sources import SOURCES, get_source, names

__all__ = ["DownloadError", "fetch", "download", "check_dataset", "MANIFEST", "SOURCES", "get_source", "names"]
