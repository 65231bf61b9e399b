"""The stream-processing runtime: clients, the transactional loop, stores, HTTP; no JODIE here."""
