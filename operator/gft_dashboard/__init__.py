"""gft-dashboard: watch and control GemmaFineTunes from a browser."""
