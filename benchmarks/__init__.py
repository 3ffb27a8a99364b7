"""Benchmarks: training throughput, sampling speed-up, compile time, memory and FLOPs in one harness.

  python -m benchmarks.run --config=configs/cifar10_cd.py --batch=8

See benchmarks/README.md for the fields and the measured results.
"""
