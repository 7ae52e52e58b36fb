"""Flower ServerApp: federated tensor-parallel fine-tuning (the logic lives in fedtp_flwr.server)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtp_flwr.server import run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, dict(context.run_config))
