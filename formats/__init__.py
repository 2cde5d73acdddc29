"""Read and write CRIU checkpoint image directories (CRIU 3.x and 4.2 formats)."""
