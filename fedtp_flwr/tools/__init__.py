"""Commands run beside the app, not shipped in the FAB: `python -m fedtp_flwr.tools.check_config` (a run
configuration, before `flwr run`), `python -m fedtp_flwr.tools.gguf_to_hf` (a GGUF Llama file -> a Hugging Face
folder to fine-tune), and on a finished run's checkpoint `python -m fedtp_flwr.tools.export` (Hugging Face or Meta
folder) and `python -m fedtp_flwr.tools.generate` (sample text)."""
