"""Everything needed to run jodie-stream: the local Kafka bootstrap, topic specs, broker configs."""
