"""Process-level plumbing: errors, atomic file IO, limits, distributed setup, precision, preemption, threads, sealed
checkpoint files."""
