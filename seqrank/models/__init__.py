"""PinnerFormer (long-term user embedding), the TransAct ranker (real-time sequence, multi-task heads), both as the
papers draw them, and inference.py: the exact rewrites of both that export traces and serving runs."""
