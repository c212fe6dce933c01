"""seqrank: sequence-aware ranking served on NVIDIA Triton."""
