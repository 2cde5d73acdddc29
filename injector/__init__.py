"""A small typed interface to a stopped live process: ptrace, memory I/O, registers, injected syscalls, dirty tracking."""
