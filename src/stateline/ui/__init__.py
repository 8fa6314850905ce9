"""The live dashboard: static HTML, CSS and JS served by the API at ``/ui`` (no build step)."""
