"""End-to-end jobs that sit above the library and below the CLI (library modules never import these)."""
