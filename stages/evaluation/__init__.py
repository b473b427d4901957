"""The evaluate stage's parts: the run's metrics, the top-k ensemble, the HTML report."""
