"""The streaming protocol as pure state machines: sequencer, exchange, the two sides, catch-up."""
