"""The train stage's parts: the model, one trial, the search's settings and algorithms, Tune's results."""
