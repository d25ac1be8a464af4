"""Sources of raw events and sinks for alerts and rejected input, one module per kind, behind `connectors.base`."""
