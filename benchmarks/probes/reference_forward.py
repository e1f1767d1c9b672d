"""Run a train_detection.py with every PVT layer on its reference code (cpu_acceleration's fast path refused)."""

import runpy
import sys

import modeling_pvt.modeling_pvt

modeling_pvt.modeling_pvt.fast_path_applies = lambda layer, hidden_states: False
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
