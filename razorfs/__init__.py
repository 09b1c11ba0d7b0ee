"""razorfs: a crash-safe FUSE filesystem (pyfuse3 + trio), write-ahead logged, checksummed.

Layers, low to high, each importing only itself and those below (tests/unit/test_layers.py):
leaf helpers (errors, log, metrics) → storage → state → offline tools (fsck, datadir) and, beside
them, actors → fuse → daemon and cli (daemon, cli, control, prometheus, mount_helper).
"""
