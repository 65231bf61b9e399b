"""The JODIE worker as an application: Kafka-free (no client, store or runtime imports)."""
