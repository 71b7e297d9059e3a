"""Benchmark suites (YAML) and their thin entry scripts; shipped as ``vlm_tta.eval``."""
