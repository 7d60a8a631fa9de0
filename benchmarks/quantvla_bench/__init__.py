"""The end-to-end benchmark of quantvla, run from a git checkout (``python benchmarks/e2e.py``).

Not part of the installed packages: it times the library (``quantvla_core``) and the kernels
(``quantvla_kernels``) of the checkout it sits in, and records that checkout's commit.

- ``bench``: options, orchestration (build, warm up, interleave, medians), table / JSON / PNG
- ``variants``: FP model, quick quantizer, W4A4 from W4A8 weights, peers
- ``chunk_timing``: ``ChunkRunner``, the chunk ``Policy.predict`` computes, stage by stage
- ``census``: ``--census``, kernel launches and bytes per stage instead of timing
"""
