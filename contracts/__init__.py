"""contracts: what every stage shares with the user and the disk.

The one bad-input error and its exit convention (errors), the YAML/flag configuration schema (schema),
files written beside and published by rename, bounded reads (files), directory locks (lock) and the
`id,label` CSV with its class names (labels). Imports nothing from the stages above it.
"""
