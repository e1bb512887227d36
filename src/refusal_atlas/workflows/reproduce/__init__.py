"""`refusal-atlas reproduce`: the two papers' claims (a)–(g), one module a claim, run by :mod:`.job`."""
