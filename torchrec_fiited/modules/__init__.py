"""The unsharded TorchRec module."""
