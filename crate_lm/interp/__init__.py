"""Opening a trained model: white-box read-outs, activation extraction, features, probes,
steering and ELK. Every tool reads a model through ``crate_lm.load`` and the hook API."""
