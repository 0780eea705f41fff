"""mclcbf-diag: measure why an attention-steering intervention does (not) change a
LLaVA-style model's answer."""

__version__ = "0.1.0"
