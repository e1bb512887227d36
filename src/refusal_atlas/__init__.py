"""refusal-atlas: map how a chat model encodes refusal, and switch it off or on.

Research software for interpretability and safety work. The flow is one-way:
data → model → activations → directions → interventions → evaluation → search → report.
"""

__version__ = "0.1.0"
