"""yolo-prune's benchmark scripts: run each from the project root as a module, e.g. ``python -m bench.frontier``.

``bench.common`` holds what they share (environment, work folder, datasets, result JSONs); results go to
``bench/results`` and are rendered into BENCHMARKS.md by ``python -m bench.render``.
"""
