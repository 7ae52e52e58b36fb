"""Flower ServerApp: federated tensor-parallel fine-tuning (the logic lives in fedtp_flwr.server.app)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedtp_flwr.server.app import run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run(grid, dict(context.run_config), context.run_id)
