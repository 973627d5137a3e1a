"""Training-framework integrations (optional extras): `fxcompress.integrations.lightning.Compression`,
a PyTorch Lightning callback. Import the submodule itself: this package imports no framework."""
