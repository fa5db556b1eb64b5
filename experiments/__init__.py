"""Flax RNN experiments: gradient explosion in BPTT and its cure by clipping."""
