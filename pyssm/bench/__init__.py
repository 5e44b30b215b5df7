"""pyssm's benchmark suite: kernels, encoders and the VLM, measured side by side in one process
(``pyssm bench``, ``python -m pyssm.bench``), with reports, plots, comparisons and profiles.
The modules: harness (timing), env (environment, NVML), results (JSON / markdown), ceilings,
one module per benchmark (ss2d, selective_scan, cross_scan, attention, encoders, vlm), fit,
plots, report, compare, profile, cli."""
