"""What the root scripts import and never run: config reading, checkpoints, reports and atomic
writes, the shard format and its readers, input sources, and the hardware helpers."""
