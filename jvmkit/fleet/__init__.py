"""jvmkit fleets: many VMs on one host (`jvmkit up`), one balloon decision-maker per host."""
