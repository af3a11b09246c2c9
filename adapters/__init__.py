"""Everything that touches the world: asyncssh adapter, backends, CLI, logging."""
