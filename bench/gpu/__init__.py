"""Device scripts: thin command-line entry points over the benches' shared code
(`python -m bench.gpu.<script>` from the repository root), and the shell scripts of device runs."""
