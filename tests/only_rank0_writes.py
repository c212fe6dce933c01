"""`python -m seqrank.cli ...` for torchrun, with every rank but 0 unable to write a byte to any file.

RLIMIT_FSIZE = 0 makes the kernel refuse any write that would grow a regular file (whatever writes it: Python, torch's
C++ serializer, safetensors' Rust), with SIGXFSZ ignored the write fails with EFBIG, so a rank other than 0 that writes
anything into the run directory fails, and torchrun with it. Pipes (the log on stderr) are not files and stay
writable. tests/test_distributed.py runs `torchrun ... tests/only_rank0_writes.py train ...`.
"""
import os
import resource
import runpy
import signal
import tempfile

if os.environ.get("RANK", "0") != "0":
    # tempfile finds its directory by writing a probe file into it, on the first call (torch's lazy imports make
    # one): made here, before the limit, and cached -- the probe is the library's, not a file of the run
    tempfile.gettempdir()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
runpy.run_module("seqrank.cli", run_name="__main__", alter_sys=True)
