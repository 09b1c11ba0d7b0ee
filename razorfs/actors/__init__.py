"""The actors layer: the mailbox, what actors say (``messages``), the tree manager, WAL writer,
block allocator and recovery coordinator, and their wiring (``system``). Imports the state and
storage layers, never the FUSE layer or the daemon."""
