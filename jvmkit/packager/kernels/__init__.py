"""Guest kernels: `jvmkit kernel pull/import/ls` and what each target needs to boot.

    store     the one kernel cache of both targets (layout, kernel.json, listing, entries)
    linux     Debian cloud kernels and imported bzImage/vmlinux files for `--target linux`
    modules   the guest kernel modules a Linux kernel needs, and their load order
    bzimage   bzImage headers and payloads (getting the vmlinux out)
    osv       OSv loader kernels: release pulls, imports, what a kernel offers, loader images
ELF files are read by `jvmkit.packager.elf`.
"""
