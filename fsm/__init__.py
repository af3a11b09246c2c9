"""Load, validate, compile and draw sshspec state-machine specs. No I/O beyond the specs."""
