"""Reads finished runs (run folders or MLflow) into tidy frames; statistics, figures and tables."""
