"""The FUSE layer: the pyfuse3 adapter (``operations``), the copy-on-write data path, the Linux
set-id rules and the one error edge. Imports the actors and the layers below, never the daemon."""
