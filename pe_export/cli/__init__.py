"""The pe-export command line (installed as `pe_export.cli`)."""
