"""Code that runs inside Triton: the Python backend's feature building (preprocess), run batching, BYTES tensors
and the CPU ranker graph. The code that runs Triton itself (launcher, supervisor) is seqrank.server."""
