"""The worker processes, one per job, each with its two halves (host and guest): ``exec``,
``proxy``, ``subnet``. No worker imports another."""
