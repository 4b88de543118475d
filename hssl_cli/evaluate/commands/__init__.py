"""One module per evaluation command: open (opening.open_for_evaluation), measure, return a plain dict."""
