"""The fxcompress file format: save / load any GraphModule without pickle and without running code.

    container  the versioned, checksummed layout: header, bounded manifest, tensor segments
    graphdata  the graph and module tree as JSON data, every name and path checked on load
    allowlist  what a file may name: functions, tensor methods, module types (and registered ones)
"""
from .allowlist import register_function, register_module
from .container import from_bytes, load, save, to_bytes

__all__ = ["from_bytes", "load", "register_function", "register_module", "save", "to_bytes"]
