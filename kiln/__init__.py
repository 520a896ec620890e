"""The `kiln` command: dispatches to export/, engine/ and server/ without importing what it does not need."""
