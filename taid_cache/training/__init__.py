"""Stage two's parts: the data stream from a cache, the distributed student, checkpoints."""
