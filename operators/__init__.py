"""The JODIE math, pure: model, t-batch, training, evaluation, retrieval. No Kafka, no Faust."""
