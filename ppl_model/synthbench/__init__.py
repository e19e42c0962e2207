"""synthbench: a benchmark of small self-trained image generators, for cross-generator detector tests."""
