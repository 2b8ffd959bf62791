"""Small helpers shared by the models, the training package and the benchmarks.

* :mod:`.fs`: atomic, fsynced writes of files and whole directories.
* :mod:`.net`: a free local TCP port.

Nothing here imports torch, so the helpers are cheap to import anywhere.
"""
from .fs import atomic_directory, fsync_path, replace_directory, write_json_atomic, write_text_atomic
from .net import free_port

__all__ = ["atomic_directory", "fsync_path", "free_port", "replace_directory", "write_json_atomic",
           "write_text_atomic"]
