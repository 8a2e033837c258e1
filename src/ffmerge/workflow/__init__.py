"""Workflow plumbing: what the Snakemake rules call (pipeline), start-up checks (preflight), job wrappers,
atomic writes, the fork server and the Snakemake scheduler workaround. The method itself lives one level up."""
