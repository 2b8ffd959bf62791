"""The flexmoe_kernels benchmark harness (outside the package).

Run ``python -m benchmarks.run --help`` from the repository root (or ``python benchmarks/run.py``).

Modules:
    harness     timing (do_bench / CUDA events / CPU timer), run metadata, rows, output files
    presets     named layer shapes, token counts, end-to-end model sizes
    providers   the layer implementations compared (ours, dense, cuBLAS, grouped_mm, HF, MegaBlocks)
    bench_layer / bench_routing / bench_e2e   the three benchmarks
    report      markdown summary, plots and the ``--targets`` report
    kernel_compile / compile_report   compile every Triton kernel of one layer call for a GPU
                architecture without a GPU, and report wgmma / TMA / buffers / registers / spills
                (``python -m benchmarks.compile_report --help``)
"""
