"""In-process test layer: real Embedding and Language engines in one process,
wired through fakes (`fakes.py`) instead of torch.distributed and ZeroMQ, so
that every interleaving a test cares about is chosen by the test, not by the
scheduler. See `fakes.py` for what each fake promises."""
