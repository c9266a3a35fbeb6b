"""Tables, plots and reports of runs."""
