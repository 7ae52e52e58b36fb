"""Commands run beside the app, not shipped in the FAB: `python -m fedtp_flwr.tools.check_config` (a run
configuration, before `flwr run`), `python -m fedtp_flwr.tools.export` (a finished run's checkpoint as a Hugging
Face or Meta folder) and `python -m fedtp_flwr.tools.generate` (sample text)."""
