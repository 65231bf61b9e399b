"""A local single-node Apache Kafka (KRaft) fetched from Maven Central and run on 127.0.0.1."""
