"""The napari layer of paintseg: thin wrappers around the core; the only place Qt is used."""
