"""Benchmark support: RL-like weight updates and codec measurements.

`rl_updates` turns a toy model into a stream of bf16 snapshots whose change
pattern looks like real RL training (a few percent of elements move per step,
mostly by one unit in the last place); `codecs` measures every codec on them.
"""
