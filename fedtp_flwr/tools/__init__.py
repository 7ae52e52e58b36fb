"""Commands on a finished run's checkpoint, not shipped in the FAB: `python -m fedtp_flwr.tools.export`
(Hugging Face or Meta folder) and `python -m fedtp_flwr.tools.generate` (sample text)."""
