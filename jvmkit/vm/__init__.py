"""Running VMs: the QEMU argv and probes, QMP, run directories, and `jvmkit run`."""
