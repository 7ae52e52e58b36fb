"""fedtp-flwr: federated tensor-parallel fine-tuning of Llama 3.2 with Flower."""

__version__ = "0.1.0"
