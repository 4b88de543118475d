"""hssl sweep: suites of pretrain + evaluation cells (suite.py), running a cell (run.py), the report (report.py)."""
