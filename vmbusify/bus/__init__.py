"""The bus: the only place that speaks ZeroMQ; the worker library (``WorkerLink``) and the
framing of every bus message (docs/protocol.md, "The bus")."""
