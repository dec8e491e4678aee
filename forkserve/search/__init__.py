"""Search on the prefix tree: HF-exact beam search and fork/join tree search."""
