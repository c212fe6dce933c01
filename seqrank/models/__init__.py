"""PinnerFormer (long-term user embedding) and the TransAct ranker (real-time sequence, multi-task heads)."""
