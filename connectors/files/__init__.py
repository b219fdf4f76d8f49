"""Files (``kind = "files"``: reads and atomic writes below a root) and a directory watcher
(``kind = "file_watcher"``: new or changed files as arrival events).

``python -m connectors.files.watch`` runs the watcher on its own and publishes its events to
Kafka.
"""

from connectors.files._common import count_rows
from connectors.files._sink import FilesFactory, FilesOptions, FilesSink
from connectors.files._watcher import FileWatcherFactory, FileWatcherOptions, FileWatcherSource

__all__ = [
    "FileWatcherFactory",
    "FileWatcherOptions",
    "FileWatcherSource",
    "FilesFactory",
    "FilesOptions",
    "FilesSink",
    "count_rows",
]
