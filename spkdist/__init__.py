"""spkdist: speaker-identification training from webdataset shards with Accelerate/DeepSpeed."""

__version__ = "0.1.0"
