"""Benchmarks and the paper's analytic decode-cost model (arXiv 2507.19427, sections 4-6).

`architectures` describes models as data, `hardware` accelerators, `cost_model` derives the paper's
tables from the two, and `planner` sizes an AFD deployment. Nothing here needs a GPU.
"""
