"""The live dashboard: a Kafka reader of the pipeline's topics, a JSON API, and the page."""
