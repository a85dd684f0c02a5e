"""The pipeline's stages, one module each, in the order jobs.pipeline runs them: embed, train, index (the build;
the shard format and search are clipita/index.py), evaluate, and report (metrics.md, metrics.png)."""
