"""Sans-I/O codecs: the vmbus package, credit windows, tunnel messages and each worker's
messages (docs/protocol.md). Imports only the layer below it (errors)."""
