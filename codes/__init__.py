"""The message-code catalog."""
