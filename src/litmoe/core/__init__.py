"""What every layer shares: errors and exit codes, command-line parsing, the settings sections, safe
checkpoint I/O, scoped patching and the one-run-per-directory lock. Imports nothing else of litmoe."""
