"""The state machine layer: the metadata tree, the redo-operation schema that changes it, the
checkpoint body codec, and recovery (checkpoint + log replay). Imports only storage and leaf
helpers, never the actors: offline tools (fsck, datadir) build on it directly."""
