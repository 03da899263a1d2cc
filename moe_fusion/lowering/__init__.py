"""spec → kernels and streams: the reference semantics, the Triton kernels and the dispatch between them."""
