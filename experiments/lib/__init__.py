"""A small library for the studies and benchmarks in experiments/."""
