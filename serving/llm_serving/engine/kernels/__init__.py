"""GPU attention kernels over the paged KV cache, and the choice between them and SDPA (`select`)."""
