"""What a ClientApp runs: build this node's slice model from the server's message, train or evaluate it on the
node's own data, reply (`app.train_reply`, `app.evaluate_reply`). Never imports `fedtp_flwr.server`."""
