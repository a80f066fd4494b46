"""The machine: device mesh, memory plan, FLOPs, host allocator, the torch-free import guard."""
