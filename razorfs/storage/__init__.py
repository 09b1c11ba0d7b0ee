"""The storage layer, the lowest: the storage interface and its two implementations (real files,
the crash-simulating disk), every on-disk byte layout (``formats``), the block store, WAL segments
and checkpoint files. Imports nothing of razorfs above it."""
