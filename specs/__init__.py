"""The bundled lifecycle specs (YAML), shipped as package data."""
