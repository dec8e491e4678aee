"""`forkserve bench`: the shared workloads on forkserve and on vLLM, in one run on one GPU."""
